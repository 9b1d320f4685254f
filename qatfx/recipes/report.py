"""The demo's report: a markdown table, a JSON file, and two PNG plots.

Every number says where it comes from: perplexities are exp(mean next-token NLL) on the
held-out test split (a prefix of it, see the preset), the QAT column is the *converted*
model's (equal to the fake-quant model's: checked), bytes are the module's tensors.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict
from pathlib import Path

from qatfx.recipes.demo import (
    DEPLOYED_SCHEME,
    EVERYWHERE_SCHEME,
    EXECUTORCH_PRESET,
    FLOAT_CONTROL,
    LLAMA_CPP_PRESET,
    SCHEMES,
    DemoResult,
    mean_and_spread,
    recovered,
)


def _fmt(values: list[float]) -> str:
    mean, spread = mean_and_spread(values)
    return f"{mean:.4f}" if len(values) == 1 else f"{mean:.4f} ± {spread:.4f}"


def _pct(value: float, reference: float) -> str:
    return f"{100 * (value / reference - 1):+.2f}%"


# A share recovered is only printed where PTQ's loss stands out of the seed-to-seed spread of
# fine-tuning: below NOISE_SIGMAS sample standard deviations it says "within noise".
NOISE_SIGMAS = 3


def _recovered_cell(row) -> str:
    shares = [recovered(c, p, q) for c, p, q in zip(row.control_ppl, row.ptq_ppl, row.qat_ppl)]
    known = [s for s in shares if s is not None]
    if not known:
        return "n/a (PTQ lost nothing)"
    mean, spread = mean_and_spread(known)
    if len(shares) == 1:
        return f"{100 * mean:.0f}% (1 seed: spread unknown, run --seeds 3)"
    # The seed spread of a fine-tuned model's perplexity: the control's or QAT's, the larger.
    noise = max(mean_and_spread(row.control_ppl)[1], mean_and_spread(row.qat_ppl)[1])
    ptq_loss = mean_and_spread(row.ptq_ppl)[0] - mean_and_spread(row.control_ppl)[0]
    if ptq_loss < NOISE_SIGMAS * noise:
        return f"within noise (PTQ loss {ptq_loss:.4f} < {NOISE_SIGMAS} x seed std {noise:.4f})"
    text = f"{100 * mean:.0f}% ± {100 * spread:.0f}%"
    return text if len(known) == len(shares) else f"{text} ({len(known)}/{len(shares)} seeds)"


def markdown_table(result: DemoResult) -> str:
    lines = [
        "| weights (activations int8 per token) | float control | PTQ | QAT | QAT recovers | bytes |",
        "|---|---|---|---|---|---|",
    ]
    for row in result.rows:
        control = mean_and_spread(row.control_ppl)[0]
        ptq, qat = mean_and_spread(row.ptq_ppl)[0], mean_and_spread(row.qat_ppl)[0]
        lines.append(
            f"| {row.scheme} | {_fmt(row.control_ppl)} | {_fmt(row.ptq_ppl)} ({_pct(ptq, control)}) "
            f"| {_fmt(row.qat_ppl)} ({_pct(qat, control)}) | {_recovered_cell(row)} "
            f"| {row.converted_bytes / 1e6:.2f} MB |"
        )
    return "\n".join(lines)


def markdown_report(result: DemoResult) -> str:
    seeds = len(result.seeds)
    return "\n".join([
        f"# qatfx demo: QAT vs PTQ ({result.preset} preset)",
        "",
        f"- corpus: {result.corpus}",
        f"- model: Llama-style character LM, {result.parameters / 1e6:.2f}M parameters, {result.model}",
        f"- float model (before the extra steps): test perplexity {result.float_ppl:.4f}, {result.float_bytes / 1e6:.2f} MB",
        f"- seeds: {seeds} (fine-tuning batch order); cells are mean ± sample std over seeds" if seeds > 1 else "- seeds: 1",
        "- perplexity: exp(mean next-token NLL) on the held-out test split; lower is better",
        "- float control: the float model fine-tuned for the same extra steps as QAT (QAT+LoRA rows: their own, below);",
        "  PTQ: that control converted directly; QAT: the float model fine-tuned with fake-quant, then converted",
        "- QAT recovers: (PTQ - QAT) / (PTQ - control), per seed, then averaged; \"within noise\" where PTQ's "
        f"loss is under {NOISE_SIGMAS} seed standard deviations of the fine-tuned perplexity (one seed: the spread is unknown)",
        _contract_line(result),
        "- bytes: the converted model's tensors (packed int4 two per byte with fp32 scales; int3 and int8 codes are kept "
        "one per byte, qatfx packs only int4; embeddings and norms stay float unless the row quantizes them)",
        *_preset_lines(result),
        f"- run time: {result.seconds:.0f} s",
        "",
        markdown_table(result),
        "",
        *_notes(result),
        *_deploy_lines(result.deploy),
        *_deploy_lines(result.preset_deploy),
        *_file_export_lines(result.file_exports),
    ])


def _preset_lines(result: DemoResult) -> list:
    """What each per-layer row quantizes how (qatfx.presets)."""
    notes = {
        EVERYWHERE_SCHEME: "every linear 8da4w g32 and the embedding table int4 g32",
        EXECUTORCH_PRESET: "ExecuTorch's Llama QAT recipe: 8da4w g32 (bf16 scales) body, 8da8w output, int8 per-row embeddings",
        LLAMA_CPP_PRESET: "llama.cpp's Q4_0 body (Q8_0 activations), Q8_0 output and token embeddings",
    }
    return [f"- {row.scheme}: {notes[row.scheme]}" for row in result.rows if row.scheme in notes]


def _notes(result: DemoResult) -> list:
    """The bullets under the table: other controls, then what the LoRA rows trained."""
    notes = [*_control_lines(result), *_lora_lines(result)]
    return [*notes, ""] if notes else []


def _control_lines(result: DemoResult) -> list:
    """The rows whose float control (and so PTQ) is not the fully fine-tuned float model's."""
    groups: dict[str, list[str]] = {}
    for row in result.rows:
        if row.control and row.control != FLOAT_CONTROL:
            groups.setdefault(row.control, []).append(row.scheme)
    return [
        f"- float control of {', '.join(names)}: {control} (fake-quant off, same steps and seed as QAT); its PTQ is "
        "that control merged (qatfx.merge_lora) and converted, so \"QAT recovers\" compares like with like"
        for control, names in groups.items()
    ]


def _contract_line(result: DemoResult) -> str:
    line = "- the converted QAT model's perplexity equals the fake-quant model's on every row (checked)"
    if any(SCHEMES[row.scheme].lora_mode == "torchtune" for row in result.rows):
        line += ", except torchtune-mode QAT+LoRA, whose merge changes the model (below)"
    return line


def _lora_lines(result: DemoResult) -> list:
    """What the QAT+LoRA rows trained, and (torchtune mode) what merging changed."""
    out = []
    for row in result.rows:
        mode = SCHEMES[row.scheme].lora_mode
        if mode is None:
            continue
        trained, deployed = mean_and_spread(row.qat_fake_quant_ppl)[0], mean_and_spread(row.qat_ppl)[0]
        share = f"{row.trainable_parameters:,} trainable parameters ({row.trainable_parameters / result.parameters:.1%})"
        if mode == "merge_consistent":
            out.append(f"- {row.scheme}: {share}; trains fq(W + sBA), so the merged, converted model scores "
                       "exactly what trained (checked)")
        else:
            out.append(f"- {row.scheme}: {share}; trained fq(W) x_q + sBA x (perplexity {_fmt(row.qat_fake_quant_ppl)}), "
                       f"deploys fq(W + sBA) x_q after merging ({_fmt(row.qat_ppl)}): the merge gap costs "
                       f"{_pct(deployed, trained)} (merge_consistent mode has none)")
    return out


def _deploy_lines(deploy) -> list:
    if deploy is None:
        return []
    batch, tokens = deploy.window
    return [
        f"## Deployed: {deploy.scheme} QAT model as an ExecuTorch program (XNNPACK)",
        "",
        f"- .pte: {deploy.pte_bytes / 1e6:.2f} MB, {deploy.delegated} quantized linears delegated; verified against the converted "
        f"model: relative logit error {deploy.relative_error:.2e}, next-token agreement {deploy.next_token_agreement:.1%}",
        f"- next tokens per second, each forward reading a {batch} x {tokens} token window (no KV cache), this CPU: "
        f"float model in eager torch {deploy.float_tokens_per_s:.0f}, .pte {deploy.pte_tokens_per_s:.0f} "
        f"({deploy.pte_tokens_per_s / deploy.float_tokens_per_s:.2f}x)",
        "",
    ]


def _file_export_lines(file_exports: dict) -> list:
    out = []
    for fmt, lines in file_exports.items():
        out += [f"## Exported: the {DEPLOYED_SCHEME} QAT model as {fmt.upper()}", "", "```", *lines, "```", ""]
    return out


def write_report(result: DemoResult, out_dir: Path) -> dict[str, Path]:
    """report.md, report.json, training_curves.png, perplexity.png under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "report.md", "json": out_dir / "report.json"}
    paths["markdown"].write_text(markdown_report(result))
    paths["json"].write_text(json.dumps(asdict(result), indent=2))
    paths.update(_plots(result, out_dir))
    return paths


def _plots(result: DemoResult, out_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    curves_path, bars_path = out_dir / "training_curves.png", out_dir / "perplexity.png"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, losses in result.curves.items():
        if losses and not label.startswith("float pretraining"):
            ax.plot(losses, label=label, linewidth=1)
    ax.set(xlabel="fine-tuning step", ylabel="training loss (nats/char)", title="Float control and QAT fine-tuning")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(curves_path, dpi=120)
    plt.close(fig)

    fig = perplexity_figure(result)
    fig.savefig(bars_path, dpi=120)
    plt.close(fig)
    return {"curves": curves_path, "perplexity": bars_path}


# Bar labels are row names, some 40+ characters ("int4 g32 everywhere (+ int4 g32 embeddings)"):
# wrapped to LABEL_CHARS per line, each row given ROW_INCHES of width, so labels never overlap.
LABEL_CHARS = 16
ROW_INCHES = 1.4


def bar_label(name: str) -> str:
    return "\n".join(textwrap.wrap(name, LABEL_CHARS, break_on_hyphens=False))


def perplexity_figure(result: DemoResult):
    """Bars per row: float control, PTQ and QAT test perplexity, mean with the seed spread."""
    import matplotlib.pyplot as plt

    names = [bar_label(row.scheme) for row in result.rows]
    fig, ax = plt.subplots(figsize=(max(8.0, ROW_INCHES * len(names)), 4.5))
    width = 0.27
    for i, (label, attr) in enumerate((("float control", "control_ppl"), ("PTQ", "ptq_ppl"), ("QAT", "qat_ppl"))):
        stats = [mean_and_spread(getattr(row, attr)) for row in result.rows]
        xs = [j + (i - 1) * width for j in range(len(names))]
        ax.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], label=label)
    ax.set_xticks(range(len(names)), names, fontsize=9)
    low = min(min(row.control_ppl) for row in result.rows)
    ax.set_ylim(bottom=low * 0.98)
    ax.set(ylabel="test perplexity", title="Test perplexity by weight scheme")
    ax.legend()
    fig.tight_layout()  # after the labels: makes room for their lines under the axis
    return fig
