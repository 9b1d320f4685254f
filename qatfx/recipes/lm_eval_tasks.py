"""lm-eval tasks built from the held-out (test) split of a text, for offline evaluation.

`write_local_task(text, directory, name)` writes two lm-evaluation-harness tasks, each a YAML
config beside a JSON-lines data file (lm-eval's local datasets: `dataset_path: json` with
`data_files`), from `split_text(text).test`, the 5% `qatfx finetune` and `qatfx demo` hold
out:

    {name}_ppl     loglikelihood_rolling over held-out documents (consecutive paragraphs,
                   about `doc_chars` characters each): word_perplexity, byte_perplexity and
                   bits_per_byte, as lm-eval's wikitext task reports them
    {name}_choice  multiple choice: a held-out passage (about `context_chars` characters) and
                   four continuations of about `choice_chars` characters, the real one and
                   three spans from other held-out documents; acc and acc_norm (each
                   log-likelihood divided by its choice's length in characters), as hellaswag

Every document and item is a pure function of the text and the seed: the same text gives
the same files. The files need only lm-eval's dataset loader (no network, no Hub).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from qatfx.recipes.corpus import split_text

DEFAULT_NAME = "qatfx_heldout"
LOCAL_TASKS = (f"{DEFAULT_NAME}_ppl", f"{DEFAULT_NAME}_choice")  # what `qatfx eval --tasks` builds from --text


@dataclass(frozen=True)
class HeldoutOptions:
    doc_chars: int = 2000  # a perplexity document: whole paragraphs up to at least this many characters
    context_chars: int = 80  # a choice item's passage (cut at a space); with its choice it fits a 128-token char window
    choice_chars: int = 32  # each continuation: this many characters, then to the end of the word
    choices: int = 4  # the real continuation and choices - 1 distractors
    seed: int = 0


def heldout_documents(test: str, doc_chars: int) -> list[str]:
    """The test split as documents: runs of whole paragraphs (blank-line separated), each at
    least `doc_chars` characters except the last, which joins its predecessor when shorter
    than half of that. Paragraphs are kept whole so no document starts mid-sentence."""
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", test) if p.strip()]
    documents, current = [], []
    for paragraph in paragraphs:
        current.append(paragraph)
        if sum(map(len, current)) >= doc_chars:
            documents.append("\n\n".join(current))
            current = []
    if current:
        if documents and sum(map(len, current)) < doc_chars // 2:
            documents[-1] += "\n\n" + "\n\n".join(current)
        else:
            documents.append("\n\n".join(current))
    return documents


def _span(text: str, start: int, chars: int) -> Optional[str]:
    """text[start:] up to `chars` characters, then on to the end of the word (the next space or
    newline), so that no choice ends mid-word; None when that word runs on past chars // 2
    more characters (a URL, a line of code): choices stay about `chars` long."""
    end = start + chars
    while end < len(text) and not text[end].isspace():
        end += 1
    return text[start:end] if end - start <= chars + chars // 2 else None


def _space_starts(text: str, low: int, high: int) -> list[int]:
    """Positions in [low, high) of a space that ends a word."""
    return [i for i in range(max(low, 1), min(high, len(text))) if text[i] == " " and not text[i - 1].isspace()]


def _word_start(text: str, position: int) -> int:
    """The first position at or after `position` that starts a word (or the text)."""
    while 0 < position < len(text) and not text[position - 1].isspace():
        position += 1
    return position


def choice_items(documents: list[str], options: HeldoutOptions) -> list[dict]:
    """Multiple-choice items, consecutive and non-overlapping within each document: the
    passage ends just before a space, so every continuation (real or not) starts with " "
    and a word; distractors come from other documents, chosen with `options.seed`."""
    if len(documents) < 2:
        raise ValueError("the held-out text makes fewer than 2 documents, so no distractor can come from another one; "
                         "use a longer text (or a smaller doc_chars)")
    rng = random.Random(options.seed)
    starts = [_space_starts(doc, 0, len(doc) - options.choice_chars) for doc in documents]
    items = []
    for d, doc in enumerate(documents):
        position = options.context_chars
        while True:
            cuts = _space_starts(doc, position, min(position + options.context_chars, len(doc) - options.choice_chars))
            cut = next((c for c in cuts if _span(doc, c, options.choice_chars) is not None), None)
            if cut is None:
                break
            real = _span(doc, cut, options.choice_chars)
            others = [o for o in range(len(documents)) if o != d and starts[o]]
            distractors = []
            while len(distractors) < options.choices - 1:
                other = rng.choice(others)
                candidate = _span(documents[other], rng.choice(starts[other]), options.choice_chars)
                if candidate is not None and candidate != real and candidate not in distractors:
                    distractors.append(candidate)
            label = rng.randrange(options.choices)
            choices = distractors[:label] + [real] + distractors[label:]
            start = max(0, cut - options.context_chars)
            context = doc[min(_word_start(doc, start), cut - 1):cut]  # from a word start when one is in the passage
            items.append({"context": context, "choices": choices, "label": label, "document": d})
            position = cut + len(real) + options.context_chars
    return items


def _yaml(config: dict) -> str:
    """A task config as YAML; every value is written as JSON, which YAML reads as the same value."""
    lines = []
    for key, value in config.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{key}:")
            for entry in value:
                first, *rest = entry.items()
                lines.append(f"  - {first[0]}: {json.dumps(first[1])}")
                lines.extend(f"    {k}: {json.dumps(v)}" for k, v in rest)
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def write_local_task(text: str, directory: Union[str, Path], name: str = DEFAULT_NAME,
                     options: HeldoutOptions = HeldoutOptions()) -> tuple[str, str]:
    """Write the `{name}_ppl` and `{name}_choice` tasks (YAML + JSON lines) for the test split
    of `text` into `directory` (pass it to lm-eval as an include path); returns their names.

    The data files are named by absolute path (lm-eval resolves `data_files` from the working
    directory, not the YAML's), and the datasets library's cache lives in `directory` too, so
    nothing is written under ~/.cache and deleting `directory` removes everything."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"task name {name!r}: use letters, digits, '_', '.' or '-'")
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    documents = heldout_documents(split_text(text).test, options.doc_chars)
    items = choice_items(documents, options)
    _write_jsonl(directory / f"{name}_ppl.jsonl", [{"text": doc} for doc in documents])
    _write_jsonl(directory / f"{name}_choice.jsonl", items)
    provenance = {"version": 1.0, "source": "qatfx.recipes.lm_eval_tasks: the test split (last 5%) of the text", **vars(options)}

    def common(task: str, data: str) -> dict:
        return {"task": task, "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(directory / data)}, "cache_dir": str(directory / "datasets_cache")},
                "test_split": "test"}

    ppl, choice = f"{name}_ppl", f"{name}_choice"
    (directory / f"{ppl}.yaml").write_text(_yaml({
        **common(ppl, f"{name}_ppl.jsonl"), "output_type": "loglikelihood_rolling",
        "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                        {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                        {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}],
        "metadata": provenance,
    }))
    (directory / f"{choice}.yaml").write_text(_yaml({
        **common(choice, f"{name}_choice.jsonl"), "output_type": "multiple_choice",
        # the passage ends before a space and each choice starts with it: no delimiter between
        "doc_to_text": "{{context}}", "doc_to_choice": "choices", "doc_to_target": "label", "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": provenance,
    }))
    return ppl, choice
