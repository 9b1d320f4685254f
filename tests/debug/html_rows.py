"""Reads the dump's HTML back as data (stdlib html.parser): table rows with their class and
cell texts, and every src/href, so tests assert on structure rather than on markup."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path


@dataclass
class Row:
    cls: str
    cells: list[str] = field(default_factory=list)
    cell_classes: list[str] = field(default_factory=list)
    row_id: str = ""

    def cell(self, css_class: str) -> str:
        return self.cells[self.cell_classes.index(css_class)]


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[Row] = []
        self.links: list[str] = []  # every src / href value
        self.tags: set[str] = set()
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        for name in ("src", "href", "xlink:href"):
            if attrs.get(name) is not None:
                self.links.append(attrs[name])
        if tag == "br" and self._cell is not None:
            self._cell.append("\n")
        elif tag == "tr":
            self.rows.append(Row(attrs.get("class") or "", row_id=attrs.get("id") or ""))
        elif tag in ("td", "th") and self.rows:
            self._cell = []
            self.rows[-1].cell_classes.append(attrs.get("class") or "")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].cells.append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> _Parser:
    parser = _Parser()
    parser.feed(Path(path).read_text())
    return parser
