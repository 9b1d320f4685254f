"""`qatfx eval --tasks` / qatfx.recipes.lm_eval: qatfx models under lm-evaluation-harness,
offline, on tasks built from a held-out split (qatfx.recipes.lm_eval_tasks).

The wrapper's numbers are checked against direct computations from the model's logits; the
local tasks run through lm-eval's own simple_evaluate for a float, a prepared and a converted
model (prepared == converted bit for bit), an HF export, and the CLI on a finetune-style
output directory."""

from __future__ import annotations

import importlib
import json
import math
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import qatfx
from qatfx.recipes.corpus import CharTokenizer, split_text
from qatfx.recipes.finetune import SIDECAR
from qatfx.recipes.lm_eval_tasks import LOCAL_TASKS, HeldoutOptions, heldout_documents, write_local_task
from qatfx.recipes.model import CausalLM, LMConfig
from qatfx.recipes.train import TrainConfig, train

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra: pip install -e '.[eval]'")
from lm_eval.api.instance import Instance  # noqa: E402

from qatfx.recipes.lm_eval import QATFXLM, evaluate_tasks, load_lm  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MAX_LENGTH = 64  # the tiny model's context: short enough that documents span several windows
PPL, CHOICE = LOCAL_TASKS


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: the Hub's offline switches on (also in the already imported `datasets`),
    and any TCP connection attempt fails the test."""
    import datasets

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access in an offline test: {args}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    # lm-eval records torch's environment report in every result (~5 s of subprocesses
    # here); no number depends on it
    monkeypatch.setattr("lm_eval.evaluator.add_env_info", lambda results: None)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads made a tiny forward
    80x slower. Every comparison below runs both sides under this same setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Real English prose with no download: the project's own documentation."""
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))))
    return path


@pytest.fixture(scope="module")
def models(corpus):
    """The tiny char model (qatfx's toy Llama, 1 layer), 30 float training steps on the train
    split, then 8da4w prepared and converted: (float, prepared, converted, tokenizer)."""
    torch.set_num_threads(1)
    text = corpus.read_text()
    chars = CharTokenizer.from_text(split_text(text).train)
    torch.manual_seed(0)
    model = CausalLM(LMConfig(vocab_size=chars.vocab_size, dim=64, layers=1, heads=2, hidden=128, max_seq=MAX_LENGTH))
    train(model, chars.encode(split_text(text).train), TrainConfig(steps=30, batch_size=8, seq_len=MAX_LENGTH, warmup_steps=5),
          compile=False)
    example = chars.encode(text[:32]).view(2, 16)
    prepared = qatfx.prepare_pt2e(model.eval(), qatfx.Int8DynActInt4WeightQuantizer(32), (example,))
    prepared.eval()
    return model.eval(), prepared, qatfx.convert_pt2e(prepared), chars


@pytest.fixture(scope="module")
def task_dir(corpus, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tasks")
    assert write_local_task(corpus.read_text(), directory) == LOCAL_TASKS
    return directory


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------- direct computations
@torch.no_grad()
def direct_loglikelihood(model, context: list[int], continuation: list[int], max_length: int) -> tuple[float, bool]:
    """Sum of log p(continuation | context) read off the model's logits for context +
    continuation cut to the last max_length + 1 tokens: one request alone, batch of one."""
    whole = (context + continuation)[-(max_length + 1):]
    out = model(torch.tensor([whole[:-1]]))
    logprobs = F.log_softmax(getattr(out, "logits", out).float(), dim=-1)[0]
    n = len(continuation)
    rows_ = logprobs[len(whole) - 1 - n:]
    target = torch.tensor(continuation)
    return rows_[torch.arange(n), target].double().sum().item(), bool((rows_.argmax(-1) == target).all())


def direct_rolling(model, ids: list[int], prefix: int, max_length: int) -> tuple[float, int]:
    """Every token scored once: windows predicting ids[a:b], b = a + max_length (the last: the
    end), each conditioned on the max_length tokens of [prefix] + ids before ids[b-1]
    (written from the windows' definition, not with lm-eval's helper). (sum, tokens scored)."""
    seq, total, scored, a = [prefix] + ids, 0.0, 0, 0
    while a < len(ids):
        b = min(a + max_length, len(ids))
        window = seq[max(0, b - max_length):b]  # inputs; the targets are ids[a:b], the last b - a positions
        context, continuation = window[: len(window) - (b - a) + 1], ids[a:b]
        total += direct_loglikelihood(model, context, continuation, max_length)[0]
        scored += b - a
        a = b
    return total, scored


def _word_end(text: str, position: int) -> int:
    while text[position - 1].isspace():
        position += 1
    return position


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


# ---------------------------------------------------------------------------- the wrapper
def test_loglikelihood_equals_the_models_log_softmax(models, corpus):
    model, _, converted, chars = models
    test = split_text(corpus.read_text()).test.lstrip()  # not starting with "\n", the prefix token
    a, b = _word_end(test, 40), _word_end(test, 200)  # lm-eval moves a context's trailing space to the continuation
    pairs = [(test[:a], test[a:a + 12]),  # a plain context
             ("", test[:10]),  # empty: the prefix token ("\n") is the context
             (test[:b], test[b:b + 30])]  # longer than the window: cut from the left
    for m in (model, converted):
        lm = QATFXLM(model=m, tokenizer=chars, max_length=MAX_LENGTH, batch_size=1)
        got = lm.loglikelihood(requests("loglikelihood", pairs))
        newline = chars.encode("\n").tolist()
        for (context, continuation), result in zip(pairs, got):
            ids = chars.encode(context).tolist() or newline
            # the same ops on the same tensors: exactly equal
            assert result == direct_loglikelihood(m, ids, chars.encode(continuation).tolist(), MAX_LENGTH)
        assert all(score < 0 for score, _ in got)


def test_rolling_loglikelihood_is_the_sum_over_windows(models, corpus):
    model, _, converted, chars = models
    test = split_text(corpus.read_text()).test.lstrip()
    texts = [test[:10], test[:MAX_LENGTH], test[:3 * MAX_LENGTH + 5]]  # one window, exactly one, four (the last short)
    newline = chars.encode("\n").item()
    for m in (model, converted):
        lm = QATFXLM(model=m, tokenizer=chars, max_length=MAX_LENGTH, batch_size=1)
        got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
        for text, result in zip(texts, got):
            expected, scored = direct_rolling(m, chars.encode(text).tolist(), newline, MAX_LENGTH)
            assert scored == len(text)  # every character predicted once
            assert result == expected  # the same window sums in the same order: exactly equal
        # a text that fits one window is one loglikelihood request with an empty context
        assert got[0] == lm.loglikelihood(requests("loglikelihood", [("", texts[0])]))[0][0]


def test_batching_does_not_change_results(models, task_dir):
    """Equal-length requests share a batch, never padded: a request's row is computed by the
    same ops at batch size 1 and 8, on the quantized model whose int8 activation codes would
    amplify any difference. (Padding would not be: a right-padded row runs attention over a
    longer sequence, which moved this model's logits by ~1e-7 when measured.)"""
    _, _, converted, chars = models
    items = rows(task_dir / f"{CHOICE}.jsonl")[:12]
    pairs = [(item["context"], choice) for item in items for choice in item["choices"]]
    documents = [(row["text"],) for row in rows(task_dir / f"{PPL}.jsonl")[:2]]
    one, eight = (QATFXLM(model=converted, tokenizer=chars, max_length=MAX_LENGTH, batch_size=b) for b in (1, 8))
    # Exact on the CPU this was written on. Not asserted exactly: a BLAS may block a GEMM of
    # 8 x T rows differently from one of T rows (another summation order), and an ulp can
    # move an int8 activation code, one step of 1/255 of a token's range, which moves a
    # log-likelihood by far less than 1e-2 relative; a wrong batch (mixed-up rows) moves it by O(1).
    for a, b in zip(one.loglikelihood(requests("loglikelihood", pairs)), eight.loglikelihood(requests("loglikelihood", pairs))):
        assert a[0] == pytest.approx(b[0], rel=1e-2)
    for a, b in zip(one.loglikelihood_rolling(requests("loglikelihood_rolling", documents)),
                    eight.loglikelihood_rolling(requests("loglikelihood_rolling", documents))):
        assert a == pytest.approx(b, rel=1e-2)
    assert len({len(one.tok_encode(c + x)) for c, x in pairs}) < len(pairs)  # some lengths repeat: batches formed


def test_generate_until_is_greedy_and_stops(models):
    model, _, _, chars = models
    lm = QATFXLM(model=model, tokenizer=chars, max_length=MAX_LENGTH)
    context = "The converted model "
    ids = chars.encode(context).tolist()
    for _ in range(20):  # greedy, by hand
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids[-MAX_LENGTH:]]))[0, -1].argmax()))
    greedy = chars.decode(torch.tensor(ids[len(chars.encode(context)):]))
    (free,) = lm.generate_until(requests("generate_until", [(context, {"until": [], "max_gen_toks": 20})]))
    assert free == greedy
    stop = greedy[5:7]  # a string the greedy text contains: the output ends before it
    (stopped,) = lm.generate_until(requests("generate_until", [(context, {"until": [stop], "max_gen_toks": 20})]))
    assert stopped == greedy.split(stop)[0] and len(stopped) < len(greedy)
    with pytest.raises(ValueError, match="decodes greedily only"):
        lm.generate_until(requests("generate_until", [(context, {"do_sample": True})]))


def test_a_transformers_tokenizer_uses_its_bos_and_no_special_tokens(models, corpus):
    from tests.recipes.test_finetune import bpe_tokenizer

    text = corpus.read_text()
    tokenizer = bpe_tokenizer(text[:50_000])
    tokenizer.add_special_tokens({"bos_token": "<s>"})  # a new id, past the BPE vocabulary
    torch.manual_seed(0)
    model = CausalLM(LMConfig(vocab_size=len(tokenizer), dim=64, layers=1, heads=2, hidden=128, max_seq=MAX_LENGTH)).eval()
    lm = QATFXLM(model=model, tokenizer=tokenizer, max_length=MAX_LENGTH)
    passage = split_text(text).test[:400]
    ids = tokenizer.encode(passage, add_special_tokens=False)
    assert lm.prefix_token_id == tokenizer.bos_token_id and lm.tok_encode(passage) == ids
    (got,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(passage,)]))
    expected, scored = direct_rolling(model, ids, tokenizer.bos_token_id, MAX_LENGTH)
    assert scored == len(ids) > MAX_LENGTH and got == expected


# ---------------------------------------------------------------------------- the local tasks
def test_local_task_files(corpus, task_dir, tmp_path):
    text = corpus.read_text()
    documents = [row["text"] for row in rows(task_dir / f"{PPL}.jsonl")]
    assert documents == heldout_documents(split_text(text).test, HeldoutOptions().doc_chars) and len(documents) >= 5
    # whole paragraphs of the test split, in order, none lost
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", split_text(text).test) if p.strip()]
    assert [p for d in documents for p in re.split(r"\n\s*\n", d)] == paragraphs
    items = rows(task_dir / f"{CHOICE}.jsonl")
    assert len(items) >= 50
    for item in items:
        choices, real = item["choices"], item["choices"][item["label"]]
        assert len(choices) == 4 == len(set(choices)) and all(c.startswith(" ") for c in choices)
        assert item["context"] + real in documents[item["document"]]  # the real continuation follows the passage
        others = documents[: item["document"]] + documents[item["document"] + 1:]
        assert all(any(c in doc for doc in others) for c in choices if c != real)  # distractors: other documents
    # a pure function of the text: written again, the same bytes
    write_local_task(text, tmp_path)
    for name in (f"{PPL}.jsonl", f"{CHOICE}.jsonl"):
        assert (tmp_path / name).read_bytes() == (task_dir / name).read_bytes()


def expected_metrics(lm: QATFXLM, task_dir: Path) -> dict:
    """The local tasks' metrics from the wrapper's loglikelihoods, by their definitions:
    perplexities exp(-sum LL / sum units), bits_per_byte -sum LL / (bytes ln 2); acc: the
    choice with the highest LL is the label; acc_norm: the highest LL per character of the
    choice (lm-eval divides by len(choice)). Words: lm-eval's re.split(r"\s+")."""
    documents = [row["text"] for row in rows(task_dir / f"{PPL}.jsonl")]
    scores = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(d,) for d in documents]))
    n_bytes, n_words = sum(len(d.encode()) for d in documents), sum(len(re.split(r"\s+", d)) for d in documents)
    items = rows(task_dir / f"{CHOICE}.jsonl")
    lls = lm.loglikelihood(requests("loglikelihood", [(i["context"], c) for i in items for c in i["choices"]]))
    acc = acc_norm = 0
    for n, item in enumerate(items):
        ll = [score for score, _ in lls[4 * n: 4 * n + 4]]
        acc += max(range(4), key=ll.__getitem__) == item["label"]
        acc_norm += max(range(4), key=lambda k: ll[k] / len(item["choices"][k])) == item["label"]
    return {"byte_perplexity": math.exp(-sum(scores) / n_bytes), "word_perplexity": math.exp(-sum(scores) / n_words),
            "bits_per_byte": -sum(scores) / n_bytes / math.log(2), "acc": acc / len(items), "acc_norm": acc_norm / len(items)}


def metrics(results: dict) -> dict:
    return {k.split(",")[0]: v for task in (PPL, CHOICE) for k, v in results["results"][task].items()
            if k.endswith(",none") and "stderr" not in k}


def test_local_tasks_through_lm_eval_float_prepared_converted(models, task_dir):
    model, prepared, converted, chars = models
    got = {}
    for name, m in (("float", model), ("prepared", prepared), ("converted", converted)):
        lm = QATFXLM(model=m, tokenizer=chars, max_length=MAX_LENGTH, batch_size=8)
        got[name] = metrics(evaluate_tasks(lm, LOCAL_TASKS, [task_dir]))
        expected = expected_metrics(lm, task_dir)
        assert got[name].keys() == expected.keys()
        for key, value in expected.items():
            # lm-eval aggregates the same loglikelihoods in its own order (its sums, its
            # word split): a float64 reordering, relative error <= n u_64 with n < 1e4
            assert got[name][key] == pytest.approx(value, rel=1e-12), key
    # the numerics contract: converted == prepared bit for bit, so every metric is equal
    assert got["converted"] == got["prepared"]
    assert got["prepared"] != got["float"]  # fake quantization was on
    # the 30-step model has learnt something: well under the ~100-character vocabulary's
    # uniform byte perplexity
    assert got["float"]["byte_perplexity"] < 0.5 * chars.vocab_size


def test_an_hf_export_evaluates_like_the_converted_model(models, task_dir, tmp_path):
    """Weight-only int4 (bf16 scales, the grid an HF checkpoint holds exactly) exported with
    qatfx.export.hf and loaded back by load_lm (transformers, the characters from a finetune
    output's sidecar)."""
    pytest.importorskip("compressed_tensors", reason="the hf extra: pip install -e '.[hf]'")
    from qatfx.export.hf import float_error_bound, hf
    from qatfx.export.llama_layout import llama_hparams

    model, _, _, chars = models
    quantizer = qatfx.Int4WeightOnlyQuantizer(32, scales_precision=torch.bfloat16)
    example = torch.arange(32).view(2, 16) % chars.vocab_size
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(model, quantizer, (example,)).eval())
    config = model.config
    out = _finetune_like_output(converted, chars, tmp_path / "finetune")
    report = hf(converted, tmp_path / "hf", config=config)
    lm_hf = load_lm(report.path, tokenizer=out)  # the export has no tokenizer files: the finetune output's
    lm_qat = QATFXLM(model=converted, tokenizer=chars, max_length=MAX_LENGTH)
    assert lm_hf.max_length == config.max_seq and lm_hf.prefix_token_id == lm_qat.prefix_token_id
    items = rows(task_dir / f"{CHOICE}.jsonl")[:10]
    pairs = [(i["context"], c) for i in items for c in i["choices"]]
    bound = float_error_bound(llama_hparams(config), torch.float32, MAX_LENGTH)
    for (context, choice), (hf_ll, _), (qat_ll, _) in zip(
            pairs, lm_hf.loglikelihood(requests("loglikelihood", pairs)), lm_qat.loglikelihood(requests("loglikelihood", pairs))):
        ids = lm_qat.tok_encode(context + choice)[-(MAX_LENGTH + 1):-1]
        logits = lm_qat.logits(torch.tensor([ids]))
        # hf.py's bound on ||logits_hf - logits_qat|| / ||logits_qat|| over the window; each
        # log-softmax entry moves by at most 2 max|d logit| <= 2 bound ||logits||, times the
        # choice's tokens (the log-softmax's own rounding, ~1e-7 relative, is far inside)
        assert abs(hf_ll - qat_ll) <= 2 * len(choice) * bound * logits.double().norm().item()
    # and the whole tasks run on the transformers model through lm-eval
    results = metrics(evaluate_tasks(lm_hf, LOCAL_TASKS, [task_dir], limit=20))
    assert 0 <= results["acc"] <= 1 and results["byte_perplexity"] < chars.vocab_size


# ---------------------------------------------------------------------------- loading and the CLI
def _finetune_like_output(converted, chars: CharTokenizer, out: Path) -> Path:
    """What `qatfx finetune --model builtin:charlm` writes that `qatfx eval` reads: qatfx.save
    and the sidecar (tokenizer, sequence length, context)."""
    qatfx.save(converted, out)
    sidecar = {"model": "builtin:charlm", "tokenizer": json.loads(chars.to_json()), "seq_len": MAX_LENGTH, "max_positions": MAX_LENGTH}
    (out / SIDECAR).write_text(json.dumps(sidecar))
    return out


def test_cli_runs_the_local_tasks_on_a_finetune_output(models, corpus, tmp_path, capsys):
    from qatfx.cli import main

    _, _, converted, chars = models
    out = _finetune_like_output(converted, chars, tmp_path / "finetune")
    argv = ["eval", "--model", str(out), "--tasks", ",".join(LOCAL_TASKS), "--text", str(corpus), "--limit", "20",
            "--batch-size", "4", "--out", str(tmp_path / "results.json")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "results.json").read_text())
    for task in LOCAL_TASKS:
        assert f"|{task}" in printed
    assert f"|{saved['results'][CHOICE]['acc,none']:.4f}|" in printed.replace(" ", "")
    # the saved program (qatfx.load) == the converted model, so lm-eval's numbers are the same
    lm = QATFXLM(model=converted, tokenizer=chars, max_length=MAX_LENGTH, batch_size=4)
    direct = evaluate_tasks(lm, LOCAL_TASKS, [_tasks(corpus, tmp_path / "tasks")], limit=20)
    assert metrics(saved) == metrics(direct)
    # lm-eval's own entry point builds the same model from the directory
    built = lm_eval.api.registry.get_model("qatfx").create_from_arg_string(f"pretrained={out},batch_size=2")
    assert built.max_length == MAX_LENGTH and built.batch_size == 2 and built.qatfx_tokenizer.chars == chars


def _tasks(corpus: Path, directory: Path) -> Path:
    write_local_task(corpus.read_text(), directory)
    return directory


@pytest.mark.parametrize("make_argv, message", [
    (lambda tmp, text: ["eval", "--model", "builtin:charlm"], "give --text FILE (that file's perplexity) or --tasks TASKS"),
    (lambda tmp, text: ["eval", "--model", "builtin:charlm", "--tasks", PPL], f"{PPL}: built from the test split of a text; pass --text"),
    (lambda tmp, text: ["eval", "--model", "builtin:charlm", "--text", text, "--limit", "5"], "--limit configure lm-eval tasks; add --tasks"),
    (lambda tmp, text: ["eval", "--model", "builtin:charlm", "--tasks", PPL, "--text", text, "--limit", "1.5"], "a whole number of documents"),
    (lambda tmp, text: ["eval", "--model", str(_bare_hf_dir(tmp)), "--tasks", PPL, "--text", text], "has no tokenizer files; pass the tokenizer with --tokenizer"),
], ids=["neither-text-nor-tasks", "local-task-without-text", "task-option-without-tasks", "bad-limit", "hf-dir-without-tokenizer"])
def test_eval_arguments_exit_2_with_a_clear_message(tmp_path, corpus, capsys, make_argv, message):
    from qatfx.cli import main

    with pytest.raises(SystemExit) as raised:
        main(make_argv(tmp_path, str(corpus)))
    err = capsys.readouterr().err
    assert raised.value.code == 2 and message in err, err


def test_an_unknown_task_is_named(corpus, capsys, monkeypatch):
    """Beside the local tasks (lm-eval's own 15k task files are not indexed here: ~15 s)."""
    from lm_eval.tasks import TaskManager

    from qatfx.cli import main

    monkeypatch.setattr("qatfx.recipes.lm_eval.task_manager",
                        lambda tasks, paths: TaskManager(include_path=[str(p) for p in paths], include_defaults=False))
    with pytest.raises(SystemExit) as raised:
        main(["eval", "--model", "builtin:charlm", "--tasks", f"{PPL},no_such_task", "--text", str(corpus)])
    err = capsys.readouterr().err
    assert raised.value.code == 2 and "unknown lm-eval task(s) ['no_such_task']; list them with `lm-eval ls tasks`" in err, err


def _bare_hf_dir(tmp: Path) -> Path:
    """A transformers checkpoint with a 96-id vocabulary and no tokenizer files."""
    from tests.model_zoo import BY_NAME

    BY_NAME["hf_llama"].build()[0].save_pretrained(tmp / "llama")
    return tmp / "llama"


def test_without_lm_eval_the_error_names_the_extra(monkeypatch, corpus, capsys):
    import qatfx.recipes
    from qatfx.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what a missing package looks like to import
    monkeypatch.delitem(sys.modules, "qatfx.recipes.lm_eval")
    monkeypatch.delattr(qatfx.recipes, "lm_eval")
    with pytest.raises(ImportError, match=r"pip install 'qatfx\[eval\]'"):
        importlib.import_module("qatfx.recipes.lm_eval")
    with pytest.raises(SystemExit) as raised:
        main(["eval", "--model", "builtin:charlm", "--tasks", PPL, "--text", str(corpus)])
    assert raised.value.code == 2 and "install it with: pip install 'qatfx[eval]'" in capsys.readouterr().err


def test_qatfx_imports_without_lm_eval():
    """The CLI, finetune and the task writer never import lm-eval: qatfx works without the extra."""
    import subprocess

    code = "import sys, qatfx, qatfx.cli, qatfx.recipes.finetune, qatfx.recipes.lm_eval_tasks; assert 'lm_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
