"""`qtool eval` and `--eval` on the command line: windows, gates (exit 3 after the report), bad data (one line, exit 1)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from qtool.eval.data import load_windows

from .conftest import SAMPLES, run_cli
from .eval_helpers import causal_lm, perturbed

MODEL = SAMPLES / "tiny-llama"
EVAL_TXT = SAMPLES / "eval.txt"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base = tmp_path_factory.mktemp("pair")
    ref = causal_lm("llama", base / "ref")
    return ref, perturbed(ref, base / "noisy")


def _eval(*args):
    return run_cli("eval", *map(str, args))


# -- windows ------------------------------------------------------------------------------------------

def _ids(text: str) -> list[int]:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MODEL)(text, add_special_tokens=False)["input_ids"]


def test_text_is_one_stream_cut_into_consecutive_windows(tmp_path):
    text = EVAL_TXT.read_text()
    ids = _ids(text)
    seq = 100
    w = load_windows(EVAL_TXT, [MODEL], seq_len=seq)
    assert torch.equal(torch.cat(w), torch.tensor(ids))            # nothing dropped, no special tokens
    assert [len(x) for x in w] == [seq] * (len(ids) // seq) + ([len(ids) % seq] if len(ids) % seq >= 2 else [])
    assert len(load_windows(EVAL_TXT, [MODEL], seq_len=100, samples=2)) == 2


def test_last_window_of_one_token_dropped(tmp_path):
    text = EVAL_TXT.read_text()
    n = len(_ids(text))
    w = load_windows(EVAL_TXT, [MODEL], seq_len=n - 1)
    assert [len(x) for x in w] == [n - 1]                          # the 1-token remainder is not a window
    w = load_windows(EVAL_TXT, [MODEL], seq_len=n - 2)
    assert [len(x) for x in w] == [n - 2, 2]


def test_jsonl_records_are_windows_truncated(tmp_path):
    data = tmp_path / "d.jsonl"
    recs = ["The Sun is the closest star to the Earth.", "", "Rain falls.", EVAL_TXT.read_text()]
    data.write_text("\n".join(json.dumps({"text": t}) for t in recs) + "\n\n")
    w = load_windows(data, [None, MODEL], seq_len=16)
    assert [x.tolist() for x in w] == [_ids(t)[:16] for t in recs if t]


def test_token_rows_are_windows(tmp_path):
    ids = torch.arange(40).reshape(4, 10)
    ids[2, 1:] = 0
    mask = torch.ones_like(ids)
    mask[2, 1:] = 0                                                # a row left with one token: skipped
    save_file({"input_ids": ids, "attention_mask": mask}, tmp_path / "t.safetensors")
    w = load_windows(tmp_path / "t.safetensors", [], seq_len=8)
    assert [x.tolist() for x in w] == [list(range(8)), list(range(10, 18)), list(range(30, 38))]


def test_tokenizer_from_ref_else_model(tmp_path, pair):
    ref, _ = pair
    bare = tmp_path / "bare"
    shutil.copytree(ref, bare)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (bare / f).unlink()
    # MODEL without a tokenizer: REF's is used
    r = _eval(bare, "--ref", ref, "--data", EVAL_TXT, "--seq-len", 64, "--json")
    assert r.exit_code == 0, r.stderr
    # neither has one: one line naming the folder, exit 1
    r = _eval(bare, "--data", EVAL_TXT)
    assert r.exit_code == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"error: {bare}: no usable tokenizer") and "safetensors" in r.stderr


# -- bad data -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, suffix, problem", [
    ("", ".txt", "is empty"),
    ("  \n\n", ".txt", "holds no text"),
    ("The", ".txt", "fewer than 2 tokens"),
    ('{"text": "The"}\n{"text": ""}\n', ".jsonl", "fewer than 2 tokens"),
    ('{"text": ""}\n', ".jsonl", "no record with a non-empty 'text'"),
    ('{"txt": "x"}\n', ".jsonl", "line 1 has no string field 'text'"),
    (None, ".safetensors", "fewer than 2 tokens"),
])
def test_bad_data_is_one_line_exit_1(tmp_path, content, suffix, problem):
    data = tmp_path / f"data{suffix}"
    if content is None:
        save_file({"input_ids": torch.tensor([[5], [6]])}, data)
    else:
        data.write_text(content)
    assert len(_ids("The")) == 1
    r = _eval(MODEL, "--ref", MODEL, "--data", data)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr == f"error: {data}: {r.stderr.split(': ', 2)[2]}" and problem in r.stderr and r.stderr.count("\n") == 1


def test_missing_data_and_token_outside_vocabulary(tmp_path):
    r = _eval(MODEL, "--data", tmp_path / "nope.txt")
    assert r.exit_code == 1 and "no such data file" in r.stderr
    save_file({"input_ids": torch.tensor([[5, 6, 5000]])}, tmp_path / "big.safetensors")
    r = _eval(MODEL, "--data", tmp_path / "big.safetensors")
    assert r.exit_code == 1 and "token id 5000" in r.stderr and "vocabulary of 1024" in r.stderr


def test_models_that_cannot_be_compared(tmp_path, pair):
    ref, _ = pair
    r = _eval(MODEL, "--ref", ref, "--data", EVAL_TXT)   # 2 blocks both, hidden 128 vs 64
    assert r.exit_code == 1 and "hidden size 128 differs from REF's 64" in r.stderr


def test_gate_without_ref_is_a_usage_error():
    r = _eval(MODEL, "--data", EVAL_TXT, "--max-kld", "0.1")
    assert r.exit_code == 2 and "--ref" in r.stderr


@pytest.mark.parametrize("option, value", [("--max-kld", "nan"), ("--max-ppl-ratio", "-1"), ("--min-top1", "1.5")])
def test_bad_gate_values_are_refused_before_any_work(option, value):
    r = _eval(MODEL, "--ref", MODEL, "--data", EVAL_TXT, option, value)
    assert r.exit_code == 2 and option in r.stderr


def test_api_checks_arguments_in_python_terms():
    import qtool
    with pytest.raises(qtool.ArgumentError, match="min_top1"):
        qtool.evaluate(MODEL, EVAL_TXT, ref=MODEL, min_top1=1.5)
    with pytest.raises(qtool.ArgumentError, match="batch_size"):
        qtool.evaluate(MODEL, EVAL_TXT, batch_size=0)


# -- gates --------------------------------------------------------------------------------------------

def _measured(pair, tmp_path):
    ref, noisy = pair
    r = _eval(noisy, "--ref", ref, "--data", EVAL_TXT, "--seq-len", 64, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["gate"] is None
    return json.loads(r.stdout)


@pytest.mark.parametrize("option, metric, field", [
    ("--max-kld", "kld", lambda rep: rep["kld"]["mean"]),
    ("--max-ppl-ratio", "ppl_ratio", lambda rep: rep["ppl_ratio"]),
    ("--min-top1", "top1_agreement", lambda rep: rep["top1_agreement"]),
])
def test_each_gate_exits_3_when_crossed_and_0_when_not(tmp_path, pair, option, metric, field):
    ref, noisy = pair
    value = field(_measured(pair, tmp_path))
    lower = option.startswith("--min")
    for crossed in (True, False):
        limit = value * (1.01 if lower == crossed else 0.99)
        report = tmp_path / f"{crossed}.json"
        r = _eval(noisy, "--ref", ref, "--data", EVAL_TXT, "--seq-len", 64, option, limit, "--report", report, "--quiet")
        rep = json.loads(report.read_text())                         # written before the exit
        assert rep["kind"] == "eval" and rep["gate"]["passed"] is not crossed
        if crossed:
            assert r.exit_code == 3 and rep["gate"]["failed"] == [metric]
            assert r.stderr.startswith(f"error: {noisy}: quality gate failed: {metric} ") and r.stderr.count("\n") == 1
        else:
            assert r.exit_code == 0 and rep["gate"]["failed"] == [] and r.stdout == "" and r.stderr == ""


def test_all_gates_fail_together(tmp_path, pair):
    ref, noisy = pair
    r = _eval(noisy, "--ref", ref, "--data", EVAL_TXT, "--seq-len", 64, "--max-kld", 0, "--max-ppl-ratio", 0.5,
              "--min-top1", 1, "--json")
    assert r.exit_code == 3
    g = json.loads(r.stdout)["gate"]
    assert g == {"passed": False, "failed": ["kld", "ppl_ratio", "top1_agreement"], "max_kld": 0.0,
                 "max_ppl_ratio": 0.5, "min_top1": 1.0}


def test_report_fields_are_the_typed_schema(tmp_path, pair):
    from qtool.report.schema import EvalBlock, EvalReport, EvalTiming, Kld
    rep = _measured(pair, tmp_path)
    assert list(rep) == list(EvalReport.__annotations__) and rep["kind"] == "eval"
    assert list(rep["kld"]) == list(Kld.__annotations__) and list(rep["timing"]) == list(EvalTiming.__annotations__)
    assert [list(b) for b in rep["blocks"]] == [list(EvalBlock.__annotations__)] * 2   # the tiny Llama's 2 blocks
    assert [b["index"] for b in rep["blocks"]] == [0, 1] and 0 < rep["blocks"][0]["hidden_rel_error"] < 1


def test_tables_on_stdout(pair):
    ref, noisy = pair
    r = _eval(noisy, "--ref", ref, "--data", EVAL_TXT, "--seq-len", 64, "--max-kld", 10)
    assert r.exit_code == 0
    for text in ("perplexity", "KL divergence", "top-1 agreement", "hidden-state error", "eval gate max_kld 10.0: passed"):
        assert text in r.stdout


# -- --eval on the jobs that write a model -------------------------------------------------------------

def test_quantize_eval_gate_keeps_out_and_exits_3(tmp_path):
    out, rep = tmp_path / "q", tmp_path / "q.json"
    r = run_cli("quantize", MODEL, "-o", out, "--method", "rtn", "--eval", EVAL_TXT, "--seq-len", 128,
                "--max-kld", "0.0001", "--report", rep, "--quiet")
    assert r.exit_code == 3 and (out / "config.json").is_file()
    assert r.stderr.startswith(f"error: {MODEL}: quality gate failed: --eval: kld ")
    ev = json.loads(rep.read_text())["eval"]
    assert ev["kind"] == "eval" and ev["model"] == str(out) and ev["ref"] == str(MODEL) and ev["seq_len"] == 128
    assert ev["gate"]["failed"] == ["kld"] and ev["kld"]["mean"] > 0.0001
    # the same run without the gate: exit 0, same numbers (deterministic)
    r = run_cli("quantize", MODEL, "-o", out, "--method", "rtn", "--eval", EVAL_TXT, "--seq-len", 128, "--json",
                "--overwrite")
    again = json.loads(r.stdout)["eval"]
    assert r.exit_code == 0 and again["gate"] is None and again["kld"] == ev["kld"] and again["ppl"] == ev["ppl"]


def test_gate_options_need_eval(tmp_path):
    r = run_cli("quantize", MODEL, "-o", tmp_path / "q", "--max-kld", "0.1")
    assert r.exit_code == 2 and "--eval" in r.stderr and not (tmp_path / "q").exists()


def test_merge_lora_eval_against_base(tmp_path):
    out = tmp_path / "m"
    r = run_cli("merge-lora", MODEL, SAMPLES / "tiny-llama-lora", "-o", out, "--eval", EVAL_TXT,
                "--min-top1", "0.99", "--json")
    assert r.exit_code == 3 and (out / "config.json").is_file()
    ev = json.loads(r.stdout)["eval"]
    # the adapter moves the model (it was trained on recipes): visible as KL and lower agreement
    assert ev["ref"] == str(MODEL) and ev["kld"]["mean"] > 0.01 and ev["gate"]["failed"] == ["top1_agreement"]


def test_report_file_rules(tmp_path):
    """--report follows every output's rules: never an input, an existing one replaced only with --overwrite."""
    rep = tmp_path / "eval.json"
    args = (MODEL, "--data", EVAL_TXT, "--seq-len", 128, "--samples", 2, "--report", rep, "--quiet")
    assert _eval(*args).exit_code == 0 and json.loads(rep.read_text())["kind"] == "eval"
    r = _eval(*args)
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and str(rep) in r.stderr
    assert _eval(*args, "--overwrite").exit_code == 0
    r = _eval(MODEL, "--data", EVAL_TXT, "--report", EVAL_TXT, "--overwrite")
    assert r.exit_code == 1 and "input" in r.stderr and EVAL_TXT.read_text().startswith("The Sun")
