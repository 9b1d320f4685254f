"""Static HTML for a dump folder: `index.html` (every pass in order) and one page per pass.

Plain HTML with inline CSS, no script and no external resource, so a dump can be opened
from disk, attached to a bug report or archived by CI. Rows of nodes a pass added,
removed or changed carry the classes "added", "removed" and "changed".
"""

from __future__ import annotations

import html
from typing import Iterable, Optional

from qatfx.instrument.snapshot import GraphDiff, NodeInfo, Snapshot

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em 2em; color: #1f2328; }
h1 { font-size: 1.5em; margin: 0.2em 0; } h2 { font-size: 1.15em; margin-top: 1.4em; }
nav a { margin-right: 1.2em; }
p.meta { color: #59636e; margin: 0.3em 0 1em; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d1d9e0; padding: 2px 7px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; position: sticky; top: 0; }
td.code, td.name { font-family: ui-monospace, monospace; white-space: nowrap; }
td.args { font-family: ui-monospace, monospace; min-width: 22em; max-width: 46em; overflow-wrap: anywhere; }
td.num { text-align: right; }
tr.added td { background: #dafbe1; }
tr.removed td { background: #ffebe9; }
tr.removed td.name { text-decoration: line-through; }
tr.changed td { background: #fff8c5; }
tr.failed td { background: #ffebe9; }
span.added { color: #1a7f37; font-weight: 600; } span.removed { color: #cf222e; font-weight: 600; }
span.changed { color: #9a6700; font-weight: 600; } span.skipped { color: #cf222e; }
.error { border: 1px solid #cf222e; background: #ffebe9; padding: 0.5em 1em; white-space: pre-wrap; }
.drawing { overflow: auto; max-height: 80vh; border: 1px solid #d1d9e0; background: white; }
pre { background: #f6f8fa; padding: 0.8em; overflow: auto; font-size: 12px; }
details { margin: 0.6em 0; } summary { cursor: pointer; font-weight: 600; }
.legend span { padding: 1px 6px; margin-right: 0.6em; border: 1px solid #d1d9e0; }
.legend .added { background: #dafbe1; color: inherit; } .legend .removed { background: #ffebe9; color: inherit; }
.legend .changed { background: #fff8c5; color: inherit; }
"""

_LEGEND = (
    '<p class="legend"><span class="added">added by this pass</span>'
    '<span class="removed">removed by this pass</span>'
    '<span class="changed">arguments or qatfx meta changed</span>'
    "made by: the qatfx pass (and Inductor-side rule) that created a node; source: the line "
    "of code that created it (for nodes from torch.export / torch.compile: the model's line).</p>"
)


def _e(text: object) -> str:
    return html.escape(str(text))


def _document(title: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n{body}\n</body></html>\n"
    )


def _cells(info: NodeInfo, args: Optional[str] = None, notes: Optional[str] = None) -> str:
    source = f'<td class="code" title="{_e(info.source_detail)}">{_e(info.source)}</td>'
    return (
        f'<td class="code">{_e(info.op)}</td><td class="code">{_e(info.target)}</td><td class="code">{_e(info.value)}</td>'
        f'<td class="code">{_e(info.made_by)}</td>{source}<td class="args">{_e(info.args) if args is None else args}</td>'
        f'<td class="args">{_e(info.notes) if notes is None else notes}</td>'
    )


def _was(old: str, new: str) -> Optional[str]:
    """Old and new value where a changed node's field differs; None keeps the plain value."""
    return None if old == new else f"{_e(old)}<br>&rarr; {_e(new)}"


_NODE_HEADER = "<th>op</th><th>target</th><th>value</th><th>made by</th><th>source</th><th>args</th><th>qatfx meta</th>"


def _node_table(snap: Snapshot, marks: dict, side: str, link_side: Optional[str] = None) -> str:
    rows = []
    for i, info in enumerate(snap.nodes):
        mark = marks.get(info.key, "")
        cls = f' class="{mark}"' if mark else ""
        rows.append(f'<tr{cls} id="{side}-{_e(info.name)}"><td class="num">{i}</td><td class="name">{_e(info.name)}</td>{_cells(info)}</tr>')
    return f"<table><thead><tr><th>#</th><th>name</th>{_NODE_HEADER}</tr></thead><tbody>\n" + "\n".join(rows) + "\n</tbody></table>"


def _changes(changes: GraphDiff) -> str:
    if changes.empty:
        return "<p>The graph is unchanged.</p>"
    rows = []
    for info in changes.added:
        rows.append(f'<tr class="added"><td>added</td><td class="name"><a href="#after-{_e(info.name)}">{_e(info.name)}</a></td>{_cells(info)}</tr>')
    for info in changes.removed:
        rows.append(f'<tr class="removed"><td>removed</td><td class="name"><a href="#before-{_e(info.name)}">{_e(info.name)}</a></td>{_cells(info)}</tr>')
    for old, new in changes.changed:
        cells = _cells(new, args=_was(old.args, new.args), notes=_was(old.notes, new.notes))
        rows.append(f'<tr class="changed"><td>changed</td><td class="name"><a href="#after-{_e(new.name)}">{_e(new.name)}</a></td>{cells}</tr>')
    return f"<table><thead><tr><th>change</th><th>name</th>{_NODE_HEADER}</tr></thead><tbody>\n" + "\n".join(rows) + "\n</tbody></table>"


def _counters(counters: dict) -> str:
    if not counters:
        return ""
    rows = []
    for name, count in sorted(counters.items()):
        cls = ' class="skipped"' if name.startswith("skipped:") else ""
        rows.append(f'<tr><td class="code"><span{cls}>{_e(name)}</span></td><td class="num">{count}</td></tr>')
    return (
        "<h2>Rewrites</h2><p>counters[\"qatfx\"] during this stage: the rules that fired, and "
        "<code>skipped:&lt;rule&gt;</code> for matches a check refused (the reason is logged on "
        "the <code>qatfx.lowering</code> logger at INFO).</p>"
        "<table><thead><tr><th>counter</th><th>count</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def summary_line(entry: dict) -> str:
    return (
        f"{entry['run_by']} &middot; {entry['graph']} &middot; {entry['nodes_before']} &rarr; {entry['nodes_after']} nodes "
        f"&middot; <span class=\"added\">+{entry['added']} added</span> &middot; "
        f"<span class=\"removed\">&minus;{entry['removed']} removed</span> &middot; "
        f"<span class=\"changed\">~{entry['changed']} changed</span>"
    )


def pass_page(
    entry: dict,
    before: Snapshot,
    after: Snapshot,
    changes: GraphDiff,
    drawing: Optional[str],
    drawing_note: str,
    code_before: str,
    code_after: str,
    previous_page: Optional[str],
) -> str:
    title = f"{entry['number']:02d} · {entry['title']}"
    marks = changes.status()
    nav = ['<a href="index.html">&larr; all passes</a>']
    if previous_page:
        nav.append(f'<a href="{_e(previous_page)}">previous pass</a>')
    nav += [f'<a href="{_e(f)}">{_e(f)}</a>' for f in entry["files"]]
    parts = [
        f"<nav>{''.join(nav)}</nav>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">{summary_line(entry)}</p>',
    ]
    if entry.get("error"):
        parts.append(f'<div class="error">The pass failed: {_e(entry["error"])}\nThe graph after is as the pass left it.</div>')
    parts.append(_counters(entry.get("counters") or {}))
    parts.append("<h2>Changes</h2>" + _changes(changes))
    if drawing is not None:
        caption = "Drawing (before and after in one" + (f"; {_e(drawing_note)})" if drawing_note else ")")
        parts.append(f'<details open><summary>{caption}</summary><div class="drawing">{drawing}</div></details>')
    else:
        parts.append(f"<p class=\"meta\">{_e(drawing_note)}</p>")
    parts.append(f"<details open><summary>Graph after the pass ({len(after.nodes)} nodes)</summary>{_node_table(after, marks, 'after')}</details>")
    parts.append(f"<details><summary>Graph before the pass ({len(before.nodes)} nodes)</summary>{_node_table(before, marks, 'before')}</details>")
    parts.append(f"<details><summary>Code after</summary><pre>{_e(code_after)}</pre></details>")
    parts.append(f"<details><summary>Code before</summary><pre>{_e(code_before)}</pre></details>")
    parts.append(_LEGEND)
    return _document(f"qatfx {title}", "\n".join(p for p in parts if p))


def _counter_summary(counters: dict) -> str:
    parts = []
    for name, count in sorted(counters.items()):
        cls = "skipped" if name.startswith("skipped:") else ""
        parts.append(f'<span class="{cls}">{_e(name)}&nbsp;&times;{count}</span>' if cls else f"{_e(name)}&nbsp;&times;{count}")
    return ", ".join(parts)


def index_page(folder: str, header: dict, entries: Iterable[dict], reports: Iterable[tuple[str, str]]) -> str:
    rows = []
    for entry in entries:
        name = _e(entry["title"])
        link = f'<a href="{_e(entry["page"])}">{name}</a>' if entry.get("page") else name
        number = f"{entry['number']:02d}" if entry.get("number") else ""
        files = " ".join(f'<a href="{_e(f)}">{_e(f.split(".", 1)[1])}</a>' for f in entry["files"])
        cls = ' class="failed"' if entry.get("error") else ""
        note = f"<br><span class=\"skipped\">failed: {_e(entry['error'])}</span>" if entry.get("error") else ""
        note += f"<br>{_e(entry['note'])}" if entry.get("note") else ""
        rows.append(
            f"<tr{cls}><td class=\"num\">{number}</td><td class=\"name\">{link}{note}</td><td>{_e(entry['run_by'])}</td>"
            f"<td>{_e(entry['graph'])}</td><td class=\"num\">{entry['nodes_before']} &rarr; {entry['nodes_after']}</td>"
            f"<td class=\"num\"><span class=\"added\">+{entry['added']}</span></td>"
            f"<td class=\"num\"><span class=\"removed\">&minus;{entry['removed']}</span></td>"
            f"<td class=\"num\"><span class=\"changed\">~{entry['changed']}</span></td>"
            f"<td>{_counter_summary(entry.get('counters') or {})}</td><td>{files}</td></tr>"
        )
    info = "".join(f"<li>{_e(k)}: <code>{_e(v)}</code></li>" for k, v in header.items())
    report_items = "".join(f'<li><a href="{_e(href)}">{_e(title)}</a></li>' for href, title in reports)
    body = [
        "<h1>qatfx dump</h1>",
        f"<ul class=\"meta\">{info}</ul>",
        "<p>Every qatfx pass in the order it ran: prepare_pt2e's and convert_pt2e's FX passes, "
        "mode switches, and the rewrite stages of the Inductor-side pass under "
        "<code>torch.compile(..., backend=\"qatfx\")</code> (one row per stage that changed the graph "
        "or refused a match; its compile id in brackets). Open a pass for its graph before and "
        "after, with the nodes it added, removed or changed highlighted.</p>",
        "<table><thead><tr><th>#</th><th>pass</th><th>run by</th><th>graph</th><th>nodes</th>"
        "<th>added</th><th>removed</th><th>changed</th><th>rewrites (counters)</th><th>text dumps</th></tr></thead><tbody>",
        "\n".join(rows) or '<tr><td colspan="10">no pass recorded yet</td></tr>',
        "</tbody></table>",
    ]
    if report_items:
        body.append(f"<h2>Other reports</h2><ul>{report_items}</ul>")
    body.append(_LEGEND)
    return _document(f"qatfx dump: {folder}", "\n".join(body))
