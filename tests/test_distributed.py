"""torchrun: data-parallel calibration and data-free splits across processes (gloo, 2 processes of 1 thread each),
against single-process runs of the same command. QTOOL_DIST_FULL=1 adds 3 processes and more methods."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from qtool.calib.stats import read_stats

from .conftest import CALIB, ROOT, digest, run_cli, torchrun

FULL = os.environ.get("QTOOL_DIST_FULL") == "1"


@pytest.mark.parametrize("method", ["rtn"] + (["mse"] if FULL else []))
def test_data_free_split_is_byte_identical_to_one_process(dist_model, tmp_path, method):
    assert run_cli("quantize", dist_model, "-o", tmp_path / "one", "--method", method, "--quiet").exit_code == 0
    r = torchrun("quantize", dist_model, "-o", tmp_path / "two", "--method", method, "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert digest(tmp_path / "one") == digest(tmp_path / "two")
    assert json.loads((tmp_path / "r.json").read_text())["timing"]["processes"] == 2
    assert r.stdout.count("rel_error mean") == 1  # rank 0 alone prints its summary


@pytest.mark.parametrize("nproc", [2] + ([3] if FULL else []))
def test_calibrate_statistics_equal_one_process(dist_model, tmp_path, nproc):
    ids = dist_model.parent / "ids.safetensors"
    assert run_cli("calibrate", dist_model, "--calib", ids, "-o", tmp_path / "one.safetensors", *CALIB).exit_code == 0
    r = torchrun("calibrate", dist_model, "--calib", ids, "-o", tmp_path / "many.safetensors", *CALIB, nproc=nproc)
    assert r.returncode == 0, r.stderr
    one, meta1 = read_stats(tmp_path / "one.safetensors")
    many, meta2 = read_stats(tmp_path / "many.safetensors")
    assert one.keys() == many.keys() and len(one) == 21
    assert meta1["tokens"] == meta2["tokens"] == str(6 * 32)
    for m in one:
        assert one[m]["count"] == many[m]["count"] == 6 * 32
        assert torch.equal(one[m]["absmax"], many[m]["absmax"])  # a max does not depend on the order
        # sums over windows in another grouping: float32 rounding only
        torch.testing.assert_close(many[m]["sum_sq"], one[m]["sum_sq"], rtol=1e-5, atol=0)


def _layer_errors(report_path):
    rows = json.loads(report_path.read_text())["layers"]
    return {r["name"]: r["output_error_after"] for r in rows if r.get("output_error_after") is not None}


def test_gptq_two_processes_deterministic_and_close_to_one(dist_model, tmp_path):
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer
    ids = dist_model.parent / "ids.safetensors"
    args = ["--method", "gptq", "--calib", ids, *CALIB]
    assert run_cli("quantize", dist_model, "-o", tmp_path / "one", *args, "--report", tmp_path / "one.json").exit_code == 0
    for name in ("a", "b"):
        r = torchrun("quantize", dist_model, "-o", tmp_path / name, *args, "--report", tmp_path / f"{name}.json")
        assert r.returncode == 0, r.stderr
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    one, two = _layer_errors(tmp_path / "one.json"), _layer_errors(tmp_path / "a.json")
    assert len(one) == 21 and one.keys() == two.keys()
    for name in one:
        assert two[name] == pytest.approx(one[name], rel=1e-3), name
    sd = {}
    for f in (tmp_path / "a").glob("*.safetensors"):
        sd.update(load_file(f))
    dense = CompressedTensorsDequantizer(tmp_path / "a", dtype=torch.bfloat16).process(sd)
    src = load_file(dist_model / "model.safetensors")
    for name in one:
        assert dense[name].shape == src[name].shape and not torch.equal(dense[name], src[name]), name


def test_a_rank_killed_mid_walk_leaves_no_output(dist_model, tmp_path):
    ids = dist_model.parent / "ids.safetensors"
    rc = tmp_path / "rc"
    rc.mkdir()
    r = torchrun("quantize", dist_model, "-o", tmp_path / "out", "--method", "gptq", "--calib", ids, *CALIB,
                 script=[str(ROOT / "tests" / "torchrun" / "die_at_block.py")],
                 env={"QTOOL_TEST_DIE_RANK": "1", "QTOOL_TEST_DIE_BLOCK": "1", "QTOOL_TEST_RC_DIR": str(rc)})
    assert r.returncode != 0
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left either
    assert not (rc / "rank1.rc").exists()  # killed: it never got to say anything
    assert int((rc / "rank0.rc").read_text()) != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
