"""torchrun: `eval` and `quantize --eval` data-parallel (gloo, 2 processes of 1 thread each): each process walks a
contiguous share of the windows, rank 0 reports what one process would, and every process exits alike on a gate."""
from __future__ import annotations

import json
import os

import pytest

from .conftest import ROOT, run_cli, torchrun

KLD = ("mean", "median", "p90", "p99", "max")
FULL = os.environ.get("QTOOL_DIST_FULL") == "1"  # adds 3 processes


def _eval_args(model, ids, report):
    # 6 windows in batches of 2: one process walks [0 1] [2 3] [4 5], two walk [0 1] [2] and [3 4] [5] (three: one
    # batch each)
    return ["--data", ids, "--seq-len", "32", "--batch-size", "2", "--device", "cpu", "--report", report]


def assert_same_evaluation(two: dict, one: dict, nproc: int = 2) -> None:
    """The N-process report equals the 1-process one: counts and top-1 exactly, the rest to float rounding."""
    for key in ("windows", "tokens", "predicted", "top1_agreement", "seq_len"):
        assert two[key] == one[key], key
    for key in ("ppl", "ref_ppl", "ppl_ratio"):
        assert two[key] == pytest.approx(one[key], rel=1e-9, abs=0), key
    for stat in KLD:
        assert two["kld"][stat] == pytest.approx(one["kld"][stat], rel=1e-6, abs=1e-12), stat
    assert len(two["blocks"]) == len(one["blocks"]) == 3
    for b2, b1 in zip(two["blocks"], one["blocks"]):
        assert b2["hidden_rel_error"] == pytest.approx(b1["hidden_rel_error"], rel=1e-6), b1["index"]
    assert one["timing"]["processes"] == 1 and two["timing"]["processes"] == nproc
    assert one["kld"]["mean"] > 0 and 0 < one["top1_agreement"] < 1  # a real difference was measured


@pytest.mark.parametrize("nproc", [2] + ([3] if FULL else []))
def test_eval_under_torchrun_equals_one_process(dist_model, tmp_path, nproc):
    ids = dist_model.parent / "ids.safetensors"
    q = tmp_path / "q"
    assert run_cli("quantize", dist_model, "-o", q, "--bits", "4", "--group-size", "32", "--quiet").exit_code == 0
    one = run_cli("eval", q, "--ref", dist_model, *_eval_args(q, ids, tmp_path / "one.json"), "--quiet")
    assert one.exit_code == 0, one.stderr
    r = torchrun("eval", q, "--ref", dist_model, *_eval_args(q, ids, tmp_path / "two.json"), nproc=nproc)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("perplexity") == 1  # rank 0 alone prints the report
    assert_same_evaluation(json.loads((tmp_path / "two.json").read_text()),
                           json.loads((tmp_path / "one.json").read_text()), nproc)


def test_quantize_eval_gate_fails_on_every_process(dist_model, tmp_path):
    """quantize --eval under torchrun: both processes evaluate OUT, the gate fails on both (exit 3), and the report's
    eval is the one-process evaluation's."""
    ids = dist_model.parent / "ids.safetensors"
    args = ["--bits", "4", "--group-size", "32", "--eval", ids, "--seq-len", "32", "--device", "cpu",
            "--max-kld", "0", "--quiet"]
    one = run_cli("quantize", dist_model, "-o", tmp_path / "one", *args, "--report", tmp_path / "one.json")
    assert one.exit_code == 3
    rc = tmp_path / "rc"
    rc.mkdir()
    r = torchrun("quantize", dist_model, "-o", tmp_path / "two", *args, "--report", tmp_path / "two.json",
                 script=[str(ROOT / "tests" / "torchrun" / "die_at_block.py")],
                 env={"QTOOL_TEST_DIE_RANK": "-1", "QTOOL_TEST_DIE_BLOCK": "-1", "QTOOL_TEST_RC_DIR": str(rc)})
    assert r.returncode != 0
    assert [int((rc / f"rank{i}.rc").read_text()) for i in range(2)] == [3, 3], r.stderr
    assert "quality gate failed: --eval: kld" in r.stderr
    one, two = (json.loads((tmp_path / f"{n}.json").read_text())["eval"] for n in ("one", "two"))
    assert one["gate"] == two["gate"] and not two["gate"]["passed"]
    assert_same_evaluation(two, one)


def test_each_process_walks_its_share_and_rank0_merges_in_order(dist_model, tmp_path, monkeypatch):
    """Two processes simulated in one (the group's collectives stubbed): rank 1 walks windows 3-5 only, and rank 0,
    given rank 1's walk, reports exactly what one process does."""
    import qtool
    from qtool import distributed

    class Stub(distributed.Group):
        sent: dict = {}

        def to_root(self, obj, src):
            if self.rank == src:
                Stub.sent[src] = obj
            return (obj if src == 0 else Stub.sent[src]) if self.root else None

        def broadcast_object(self, obj, src):
            return obj

    ids = dist_model.parent / "ids.safetensors"
    q = tmp_path / "q"
    assert run_cli("quantize", dist_model, "-o", q, "--quiet").exit_code == 0
    kwargs = dict(ref=dist_model, seq_len=32, batch_size=2, device="cpu")
    one = qtool.evaluate(q, ids, **kwargs)
    for rank in (1, 0):
        monkeypatch.setattr(distributed, "join", lambda device, rank=rank: Stub(rank, 2, "gloo"))
        two = qtool.evaluate(q, ids, **kwargs)
        if rank == 1:
            assert two is None and sum(s.nll.numel() for s in Stub.sent[1].scores) == 3 * 31
    assert_same_evaluation(two, one)
    for report in (one, two):   # per-position values are the same bits: all but the blocks' float64 sums is equal
        report.pop("blocks"), report.pop("timing")
    assert two == one
