"""`qatfx eval --tasks`: qatfx models under EleutherAI's lm-evaluation-harness (lm-eval).

`QATFXLM` is an `lm_eval.api.model.LM` (registered as "qatfx") around any causal LM that maps
token ids (B, T) to logits (B, T, V): a float model, a prepared (fake-quant) model, a
converted one, `qatfx.load(dir)`'s output, or a transformers model (an HF export directory);
with the tokenizers `qatfx finetune` uses (characters for builtin:charlm, UTF-8 bytes, or a
transformers tokenizer). `load_lm(source)` builds one from a `qatfx finetune` output, a
qatfx.save directory, a transformers directory or builtin:charlm; `evaluate_tasks` runs
lm-eval's `simple_evaluate` on it. docs/lm_eval.md has the commands and measured numbers.

Scoring, as lm-eval's own HF model does it: a request's input is its context + continuation
(without the last token), cut from the left to `max_length`; its log-likelihood is the sum
of the continuation's log-softmax entries. Requests are batched only with requests of the
same input length, never padded: a padded row runs attention over a longer sequence, which
moved this project's logits by ~1e-7 (measured), so results would depend on which requests
shared a batch. Unpadded, a request's row goes through the same ops at any batch size.

Importing this module needs lm-eval (`pip install 'qatfx[eval]'`); nothing else in qatfx
imports it at module level, so qatfx works without the extra.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from qatfx.recipes.corpus import CharTokenizer
from qatfx.recipes.finetune import BUILTIN_MODELS, MANIFEST, SIDECAR, Tokenizer, is_finetune_output

try:
    import lm_eval.models  # noqa: F401  (its lazy table first: lm-eval fills it only into an empty registry)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as error:  # tests/recipes/test_lm_eval.py hides lm_eval to check this message
    raise ImportError(
        f"qatfx eval --tasks runs EleutherAI's lm-evaluation-harness, which is not installed ({error}); "
        "install it with: pip install 'qatfx[eval]'"
    ) from error

log = logging.getLogger("qatfx.recipes")

DEFAULT_MAX_GEN_TOKENS = 256  # lm-eval's HF model's default


def _hf_tokenizer(tokenizer: Tokenizer):
    return tokenizer.hf if tokenizer.kind == "hf" else None


def as_tokenizer(tokenizer: Any) -> Tokenizer:
    """A finetune `Tokenizer` from what a user holds: one already, a CharTokenizer, a
    transformers tokenizer, a `qatfx finetune` output directory (its sidecar's tokenizer) or a
    transformers tokenizer directory."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, CharTokenizer):
        return Tokenizer("chars", chars=tokenizer)
    if isinstance(tokenizer, (str, Path)):
        directory = Path(tokenizer)
        if (directory / SIDECAR).exists():
            return Tokenizer.from_json(json.loads((directory / SIDECAR).read_text())["tokenizer"], directory)
        found = _directory_tokenizer(directory)
        if found is None:
            raise ValueError(
                f"tokenizer {directory}: neither a `qatfx finetune` output ({SIDECAR}) nor a transformers tokenizer "
                "directory (tokenizer.json, tokenizer.model or vocab.json); pass one of those"
            )
        return Tokenizer("hf", hf=found)
    if callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "decode", None)):
        return Tokenizer("hf", hf=tokenizer)  # a transformers tokenizer object
    raise TypeError(f"tokenizer: expected a qatfx Tokenizer, CharTokenizer, transformers tokenizer or a directory, got {type(tokenizer).__name__}")


def _directory_tokenizer(directory: Path):
    """The transformers tokenizer saved in `directory`, or None when it holds none."""
    if not any((directory / name).exists() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


@register_model("qatfx")
class QATFXLM(TemplateLM):
    """lm-eval's view of a qatfx (or any tokens -> logits) causal LM.

    `model`: an nn.Module called as model(ids) -> logits (B, T, V) (or an object with
    `.logits`); a transformers model is called with use_cache=False. It is put in eval mode
    (a prepared model's .eval() runs qatfx's train/eval pass). `max_length`: the longest input
    it is given (contexts are cut from the left, rolling windows have this length).
    `pretrained=DIR` instead of `model` loads DIR with `load_lm` (how lm-eval's
    `simple_evaluate(model="qatfx", model_args="pretrained=DIR")` builds it).

    The prefix token (the context of a document's first token, and of an empty context) is
    the tokenizer's BOS (else EOS) for a transformers tokenizer, as lm-eval's HF model does;
    for character and byte tokenizers, which have neither, it is "\\n": the character that
    precedes a passage in the running text these models train on.
    """

    def __init__(
        self,
        pretrained: Optional[str] = None,
        *,
        model: Optional[nn.Module] = None,
        tokenizer: Any = None,
        max_length: Optional[Union[int, str]] = None,
        batch_size: Optional[Union[int, str]] = 1,
        device: Optional[str] = None,
        text: Optional[str] = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        if (model is None) == (pretrained is None):
            raise ValueError("QATFXLM: give either model= (an nn.Module) or pretrained= (a directory or builtin:charlm), not both or neither")
        if pretrained is not None:
            loaded = load_lm(pretrained, tokenizer=tokenizer, max_length=max_length, text=text, batch_size=batch_size)
            model, tokenizer, max_length = loaded.model, loaded.qatfx_tokenizer, loaded.max_length
        if tokenizer is None:
            raise ValueError("QATFXLM: pass tokenizer= (a qatfx Tokenizer, CharTokenizer, transformers tokenizer or directory)")
        if max_length is None:
            raise ValueError("QATFXLM: pass max_length= (the longest input the model takes, e.g. its training sequence length)")
        if unused:
            log.debug("QATFXLM ignores lm-eval arguments %s", sorted(unused))
        self.qatfx_tokenizer = as_tokenizer(tokenizer)
        self.tokenizer = _hf_tokenizer(self.qatfx_tokenizer)  # lm-eval's chat-template code reads it
        self.model = model.eval()
        self._max_length = int(max_length)
        if self._max_length < 1:
            raise ValueError(f"QATFXLM: max_length must be >= 1, got {max_length}")
        self.batch_size = _batch_size(batch_size)
        first = next(iter(model.parameters()), None)
        first = next(iter(model.buffers()), None) if first is None else first
        self._device = torch.device(device) if device else (first.device if first is not None else torch.device("cpu"))
        if device:
            self.model.to(self._device)
        self._is_transformers = hasattr(model, "config") and hasattr(model, "can_generate")
        self._prefix = self._prefix_token()

    def describe(self) -> str:
        kind = self.qatfx_tokenizer.kind
        vocabulary = f"{self.qatfx_tokenizer.chars.vocab_size} ids" if kind == "chars" else type(self.tokenizer).__name__ if self.tokenizer else "256 bytes"
        return (f"{type(self.model).__name__}, max_length {self._max_length}, batch size {self.batch_size}, "
                f"tokenizer {kind} ({vocabulary}), prefix token {self._prefix} ({self.tok_decode([self._prefix])!r})")

    # ------------------------------------------------------------------ tokens
    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eot_token_id(self) -> int:
        return self._prefix

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def tokenizer_name(self) -> str:
        hf = self.tokenizer
        return getattr(hf, "name_or_path", "hf").replace("/", "__") if hf is not None else f"qatfx-{self.qatfx_tokenizer.kind}"

    def _prefix_token(self) -> int:
        hf = self.tokenizer
        if hf is not None:
            for token in (hf.bos_token_id, hf.eos_token_id):
                if token is not None:
                    return int(token)
        newline = self.tok_encode("\n")
        if len(newline) != 1:
            raise ValueError(f"the tokenizer has no BOS or EOS token and encodes '\\n' as {newline}, not one token: "
                             "lm-eval needs one prefix token; give the tokenizer a bos_token")
        return newline[0]

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        if self.tokenizer is not None:  # special tokens only when asked: the prefix token is lm-eval's BOS
            return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))
        return self.qatfx_tokenizer.encode(string).tolist()

    def tok_decode(self, tokens: Sequence[int]) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode(list(tokens))
        if self.qatfx_tokenizer.kind == "chars":
            return self.qatfx_tokenizer.chars.decode(torch.tensor(list(tokens), dtype=torch.long))
        return bytes(tokens).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ model calls
    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The model's logits for a (B, T) batch of token ids."""
        ids = ids.to(self._device)
        out = self.model(input_ids=ids, use_cache=False) if self._is_transformers else self.model(ids)
        return getattr(out, "logits", out)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of each (key, context ids, continuation ids)."""
        inputs, results = [], [None] * len(requests)
        truncated = 0
        for i, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise ValueError("lm-eval gave an empty context or continuation; TemplateLM puts the prefix token first")
            if len(continuation) > self._max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens is longer than max_length {self._max_length}; "
                    "raise --seq-len (max_length) or use shorter choices"
                )
            whole = (context + continuation)[-(self._max_length + 1):]
            truncated += len(context) + len(continuation) > len(whole)
            inputs.append(whole[:-1])
        if truncated:
            log.info("qatfx lm-eval: %d of %d requests were longer than max_length %d + 1; their contexts were cut from the left",
                     truncated, len(requests), self._max_length)
        for indices in tqdm(self._batches(inputs), desc="qatfx lm-eval batches", disable=disable_tqdm, leave=False, dynamic_ncols=True):
            logprobs = F.log_softmax(self.logits(torch.tensor([inputs[i] for i in indices])).float(), dim=-1)
            for row, i in enumerate(indices):
                key, _, continuation = requests[i]
                target = torch.tensor(continuation, device=logprobs.device)
                tail = logprobs[row, -len(continuation):]  # the positions that predict the continuation
                score = tail.gather(-1, target[:, None]).squeeze(-1).double().sum().item()
                results[i] = (score, bool(torch.equal(tail.argmax(-1), target)))
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, results[i])
        return results

    def _batches(self, inputs: list[list[int]]) -> list[list[int]]:
        """Indices of equal-length inputs, `batch_size` at a time, longest first (a memory error
        shows at once); never padded (module docstring)."""
        by_length = defaultdict(list)
        for i, ids in enumerate(inputs):
            by_length[len(ids)].append(i)
        return [group[s : s + self.batch_size] for length, group in sorted(by_length.items(), reverse=True)
                for s in range(0, len(group), self.batch_size)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string's log-likelihood in windows of max_length tokens (lm-eval's
        get_rolling_token_windows: every token predicted once, the last window keeps a full
        context), the first token conditioned on the prefix token."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owners = [], []
        for n, request in enumerate(requests):
            (string,) = request.args
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self._max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(n)
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += score  # windows in order, as a reader sums them
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding until a stop string or `max_gen_toks` tokens, recomputing the whole
        window each step (a qatfx graph returns logits only, no KV cache: O(n^2), fine for the
        short answers lm-eval's generation tasks ask for)."""
        outputs = []
        for request in requests:
            context, options = request.args
            options = dict(options or {})
            if options.get("do_sample") or float(options.get("temperature", 0.0) or 0.0) > 0.0:
                raise ValueError("QATFXLM decodes greedily only; the task asked for sampling (do_sample / temperature > 0)")
            until = options.get("until") or []
            until = [stop for stop in ([until] if isinstance(until, str) else until) if stop]
            max_new = int(options.get("max_gen_toks", DEFAULT_MAX_GEN_TOKENS))
            ids = self.tok_encode(context) if context else [self.prefix_token_id]
            generated: list[int] = []
            text = ""
            for _ in range(max_new):
                window = (ids + generated)[-self._max_length:]
                generated.append(int(self.logits(torch.tensor([window]))[0, -1].argmax()))
                text = self.tok_decode(generated)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return outputs


def _batch_size(value: Optional[Union[int, str]]) -> int:
    if value is None:
        return 1
    if str(value).startswith("auto"):
        raise ValueError("QATFXLM takes a fixed batch size (e.g. --batch-size 8), not 'auto'")
    number = int(value)
    if number < 1:
        raise ValueError(f"batch size must be >= 1, got {value}")
    return number


# ---------------------------------------------------------------------------- loading
def load_lm(
    source: Union[str, Path],
    *,
    tokenizer: Any = None,
    max_length: Optional[Union[int, str]] = None,
    text: Optional[str] = None,
    batch_size: Optional[Union[int, str]] = 1,
) -> QATFXLM:
    """A QATFXLM for `source`:

    - a `qatfx finetune` output: its converted model (qatfx.load), its tokenizer; max_length
      its training sequence length (what `qatfx eval --text` uses; positions past it were
      never trained for builtin:charlm), checked against its context size;
    - a qatfx.save directory: needs `tokenizer` and `max_length`;
    - a transformers directory (a checkpoint, or `qatfx export --format hf` output): its
      tokenizer (or `tokenizer`), max_length its max_position_embeddings;
    - builtin:charlm: a fresh random model whose vocabulary is the characters of `text`.
    """
    from qatfx.recipes.finetune import check_seq_len

    given = None if max_length is None else int(max_length)
    source_text = str(source)
    if source_text in BUILTIN_MODELS:
        if text is None:
            raise ValueError(f"{source_text} builds its character vocabulary from a text; pass --text FILE")
        from qatfx.recipes.finetune import load_model

        loaded = load_model(source_text, text)
        check_seq_len(given or loaded.max_positions, loaded.max_positions)
        return QATFXLM(model=loaded.module, tokenizer=tokenizer or loaded.tokenizer,
                       max_length=given or loaded.max_positions, batch_size=batch_size)
    directory = Path(source)
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory; give a `qatfx finetune` output, a qatfx.save directory, "
                         f"a transformers directory or one of {sorted(BUILTIN_MODELS)}")
    if (directory / SIDECAR).exists():
        from qatfx.recipes.finetune import load_finetuned

        module, own_tokenizer, sidecar = load_finetuned(directory)
        check_seq_len(given or sidecar["seq_len"], sidecar["max_positions"])
        return QATFXLM(model=module, tokenizer=tokenizer or own_tokenizer, max_length=given or sidecar["seq_len"],
                       batch_size=batch_size)
    if (directory / MANIFEST).exists() or is_finetune_output(directory):
        import qatfx

        if tokenizer is None or given is None:
            raise ValueError(f"{directory} is a qatfx.save directory without the {SIDECAR} `qatfx finetune` writes: "
                             "pass its tokenizer and max_length (--tokenizer DIR --seq-len N)")
        return QATFXLM(model=qatfx.load(directory), tokenizer=tokenizer, max_length=given, batch_size=batch_size)
    if not (directory / "config.json").exists():
        raise ValueError(f"{directory}: no {SIDECAR}, {MANIFEST} or config.json; give a `qatfx finetune` output, "
                         "a qatfx.save directory or a transformers directory")
    return _transformers_lm(directory, tokenizer, given, batch_size)


def _transformers_lm(directory: Path, tokenizer: Any, max_length: Optional[int], batch_size) -> QATFXLM:
    from transformers import AutoModelForCausalLM

    from qatfx.recipes.finetune import check_seq_len

    if tokenizer is None:
        tokenizer = _directory_tokenizer(directory)
        if tokenizer is None:
            raise ValueError(
                f"{directory} has no tokenizer files; pass the tokenizer with --tokenizer DIR (a transformers tokenizer "
                "directory, or the `qatfx finetune` output it was exported from, e.g. a builtin:charlm's characters)"
            )
    # float32 whatever the checkpoint's dtype, as `qatfx finetune` loads it
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    context = getattr(model.config, "max_position_embeddings", None)
    if max_length is None and context is None:
        raise ValueError(f"{directory}: its config names no max_position_embeddings; pass --seq-len N")
    check_seq_len(max_length or context, context)
    return QATFXLM(model=model, tokenizer=tokenizer, max_length=max_length or context, batch_size=batch_size)


# ---------------------------------------------------------------------------- running tasks
def task_manager(tasks: Sequence[str], include_paths: Sequence[Union[str, Path]] = ()):
    """lm-eval's TaskManager over `include_paths`, and over lm-eval's own ~15k task configs
    only when a task is not in those paths (indexing them takes ~15 s)."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_paths]
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    return TaskManager(include_path=paths or None)


def evaluate_tasks(lm: QATFXLM, tasks: Sequence[str], include_paths: Sequence[Union[str, Path]] = (),
                   limit: Optional[float] = None, **kwargs: Any) -> dict:
    """lm-eval's simple_evaluate of `lm` on `tasks` (names from lm-eval or `include_paths`);
    its results dict (results, versions, n-shot, config, ...), per-sample logs left out."""
    from lm_eval import simple_evaluate

    manager = task_manager(tasks, include_paths)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}; list them with `lm-eval ls tasks`, or pass the folder of your "
                         "task YAML files with --include-path DIR")
    kwargs.setdefault("log_samples", False)
    results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, **kwargs)
    results.pop("samples", None)
    return results


def results_table(results: dict) -> str:
    """lm-eval's own tables (per task, then per group when there are groups)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def results_json(results: dict) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"
