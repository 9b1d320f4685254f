"""The result of `qatfx.debug.compare`: per-linear error rows, and their text / HTML tables.

Error measures, both computed in float64 against the float model's output of the layer:

    SQNR (dB) = 10 * log10( sum(ref^2) / sum((ref - test)^2) )   (torchao's compute_error)
    max abs error = max |ref - test|

Over several batches the sums (and the max) run over all of them. Identical outputs give
SQNR = inf and error 0. Every 6.02 dB is one bit: a tenfold smaller error RMS is +20 dB.
"""

from __future__ import annotations

import dataclasses
import html
import math
import statistics
from dataclasses import dataclass
from typing import Optional

import torch

# A layer whose local SQNR is this far below the median of the quantized layers is marked
# as an outlier: 6.02 dB is twice the error RMS of a typical layer (one bit lost).
OUTLIER_DB = 6.02


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """SQNR of `test` against `reference` in dB; inf when they are equal."""
    acc = ErrorAccumulator()
    acc.update(reference, test)
    return acc.result().sqnr_db


@dataclass(frozen=True)
class Error:
    sqnr_db: float
    max_abs_error: float


class ErrorAccumulator:
    """Sums signal and noise power (and the max error) over batches, in float64."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.max_abs = 0.0

    def update(self, reference: torch.Tensor, test: torch.Tensor) -> None:
        ref = reference.detach().to(torch.float64)
        diff = ref - test.detach().to(torch.float64)
        self.signal += float(ref.square().sum())
        self.noise += float(diff.square().sum())
        if diff.numel():
            self.max_abs = max(self.max_abs, float(diff.abs().max()))

    def result(self) -> Error:
        if self.noise == 0.0:
            sqnr = math.inf
        elif self.signal == 0.0:
            sqnr = -math.inf
        else:
            sqnr = 10.0 * math.log10(self.signal / self.noise)
        return Error(sqnr, self.max_abs)


@dataclass(frozen=True)
class ModelErrors:
    """One quantized model's error at one layer, against the float model.

    local: the quantized layer applied to the float model's own input of the layer, so it
        measures this layer's quantization alone (activation and weight rounding).
    end_to_end: the layer's output in a full run of the quantized model, so it includes
        the error every earlier layer passed on; for a region capture, in a run of the
        layer's region from the float model's input of that region (earlier layers of the
        same region only).
    """

    local: Error
    end_to_end: Error
    weights_only: Optional[Error] = None  # local, float input x quantized weight
    activations_only: Optional[Error] = None  # local, quantized input x float weight (prepared only)

    @property
    def limited_by(self) -> str:
        """Which half of the local error dominates: "weights", "activations" or "both"
        (within 3 dB, a factor 2 in noise power); "" when the split is not known."""
        if self.weights_only is None or self.activations_only is None:
            return ""
        gap = self.weights_only.sqnr_db - self.activations_only.sqnr_db
        if math.isnan(gap) or abs(gap) <= 3.0:
            return "both"
        return "weights" if gap < 0 else "activations"


@dataclass(frozen=True)
class CompareRow:
    layer: str  # the layer name of qatfx.summary (weight path without ".weight"); "@i" for the i-th call
    module: str  # the float model's module whose forward hook gave the float activations
    op: str
    shape: tuple  # (out_features N, in_features K)
    scheme: str  # "activations x weights", or "float" for a skipped layer
    quantized: bool
    fake_quant: Optional[ModelErrors]  # the prepared model
    converted: Optional[ModelErrors]
    converted_vs_fake_quant: Optional[Error]  # end-to-end outputs; exact by the numerics contract
    note: str = ""

    @property
    def primary(self) -> Optional[ModelErrors]:
        """The errors the report sorts by: the fake-quant model's, else the converted one's."""
        return self.fake_quant if self.fake_quant is not None else self.converted


def sort_key(row: CompareRow, index: int) -> tuple:
    """Worst local SQNR first, then worst end-to-end; layers without float capture last."""
    errors = row.primary
    if errors is None:
        return (1, math.inf, math.inf, index)
    return (0, errors.local.sqnr_db, errors.end_to_end.sqnr_db, index)


def mark_outliers(rows: list[CompareRow]) -> list[CompareRow]:
    """Add an outlier note to quantized rows far below the median local SQNR."""
    finite = [r.primary.local.sqnr_db for r in rows if r.quantized and r.primary and math.isfinite(r.primary.local.sqnr_db)]
    if len(finite) < 3:
        return rows
    median = statistics.median(finite)
    marked = []
    for r in rows:
        below = median - r.primary.local.sqnr_db if r.quantized and r.primary else 0.0
        if below > OUTLIER_DB:
            note = f"outlier: {below:.1f} dB below the median layer"
            if r.primary.limited_by in ("weights", "activations"):
                note += f", limited by its {r.primary.limited_by}"
            r = dataclasses.replace(r, note=f"{note}; {r.note}" if r.note else note)
        marked.append(r)
    return marked


def _db(error: Optional[Error]) -> str:
    if error is None:
        return "-"
    return "inf" if error.sqnr_db == math.inf else f"{error.sqnr_db:.1f}"


def _err(error: Optional[Error]) -> str:
    return "-" if error is None else f"{error.max_abs_error:.3g}"


def _exact(error: Optional[Error]) -> str:
    if error is None:
        return "-"
    return "exact" if error.max_abs_error == 0.0 else f"{error.max_abs_error:.3g}"


@dataclass(frozen=True)
class CompareReport:
    """Rows sorted worst first (by local SQNR of the fake-quant model, else the converted).

    `str(report)` / `to_markdown()`: a table; `to_html()`: a self-contained page;
    `worst()`: the first row.
    """

    rows: tuple
    batches: int
    has_fake_quant: bool
    has_converted: bool
    regional: bool = False  # a region capture: end to end is from each region's input

    @property
    def end_to_end_meaning(self) -> str:
        """What the end-to-end columns measure, for the table's note."""
        if self.regional:
            return (
                "the layer's output when its region (the captured block or linear holding it) runs on the float "
                "model's input of that region (includes the error of the earlier layers of that region only)."
            )
        return "the layer's output in a full quantized run (includes earlier layers' error)."

    def worst(self) -> CompareRow:
        return self.rows[0]

    def row(self, layer: str) -> CompareRow:
        for r in self.rows:
            if r.layer == layer:
                return r
        raise KeyError(f"no layer {layer!r} in the report; layers: {[r.layer for r in self.rows]}")

    @property
    def _primary_label(self) -> str:
        return "fake-quant" if self.has_fake_quant else "converted"

    def _table(self) -> tuple[list[str], list[list[str]]]:
        header = ["layer", "scheme", "local SQNR dB", "local max err", "w-only / a-only dB", "end-to-end SQNR dB", "end-to-end max err"]
        if self.has_fake_quant and self.has_converted:
            header.append("converted vs fake-quant")
        header.append("note")
        body = []
        for r in self.rows:
            e = r.primary
            cells = [
                r.layer,
                r.scheme,
                _db(e and e.local),
                _err(e and e.local),
                f"{_db(e and e.weights_only)} / {_db(e and e.activations_only)}",
                _db(e and e.end_to_end),
                _err(e and e.end_to_end),
            ]
            if self.has_fake_quant and self.has_converted:
                cells.append(_exact(r.converted_vs_fake_quant))
            cells.append(r.note)
            body.append(cells)
        return header, body

    def _summary_line(self) -> str:
        models = " and ".join(m for m, present in (("fake-quant", self.has_fake_quant), ("converted", self.has_converted)) if present)
        return (
            f"qatfx compare: {len(self.rows)} linear layers, {self.batches} batch(es), {models} model vs float; "
            f"errors of the {self._primary_label} model, worst local SQNR first"
            + ("; region capture: end to end from each region's input" if self.regional else "")
        )

    def to_markdown(self) -> str:
        header, body = self._table()
        lines = [self._summary_line(), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
        lines += [
            "",
            "local: the quantized layer on the float model's input of that layer (its own error); "
            "w-only / a-only: the same with only the weights / only the input activations quantized. "
            "end-to-end: " + self.end_to_end_meaning,
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def to_html(self) -> str:
        """A self-contained page: inline style, no script, no external resource."""
        header, body = self._table()
        local_col = header.index("local SQNR dB")
        local = [r.primary.local.sqnr_db if r.primary else math.nan for r in self.rows]
        top = max((v for v in local if math.isfinite(v) and v > 0), default=1.0)
        rows_html = []
        for r, cells, value in zip(self.rows, body, local):
            tds = []
            for i, cell in enumerate(cells):
                text = html.escape(cell)
                if i == local_col and math.isfinite(value):
                    # bar length proportional to the local SQNR, so the worst rows stand out
                    text = f'<span class="bar" style="width:{max(0, round(120 * value / top))}px"></span>{text}'
                tds.append(f"<td>{text}</td>")
            cls = ' class="outlier"' if "outlier" in r.note else ""
            rows_html.append(f"<tr{cls}>{''.join(tds)}</tr>")
        return _PAGE.format(
            summary=html.escape(self._summary_line()),
            header="".join(f"<th>{html.escape(h)}</th>" for h in header),
            rows="\n".join(rows_html),
            outlier_db=OUTLIER_DB,
            end_to_end=html.escape(self.end_to_end_meaning),
        )


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qatfx compare</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; white-space: nowrap; }}
th {{ background: #f0f0f0; }}
tr.outlier td {{ background: #fde2e2; }}
.bar {{ display: inline-block; height: 9px; background: #6a9fd4; margin-right: 6px; }}
p {{ max-width: 60em; }}
</style></head><body>
<h1>qatfx compare</h1>
<p>{summary}</p>
<p><b>local</b>: the quantized layer applied to the float model's own input of that layer:
the error this layer's quantization adds by itself. <b>w-only / a-only</b>: the local SQNR
with only the weights (float input) or only the input activations (float weight) quantized,
which says whether a smaller weight group size can help; a converted model has no float
weights left, so it shows only the first. <b>end-to-end</b>: {end_to_end}
SQNR = 10 log10(sum ref&sup2; / sum (ref &minus; test)&sup2;), in dB against the float model;
higher is better, 6 dB is one bit. <b>converted vs fake-quant</b> should read "exact".
Rows in red are more than {outlier_db} dB below the median layer.</p>
<table>
<thead><tr>{header}</tr></thead>
<tbody>
{rows}
</tbody></table>
</body></html>
"""
