"""`qtool quantize --calib` through the CLI: GPTQ output passes the compressed-tensors round trip, is
deterministic, and reports per-layer output errors on the calibration data."""
from __future__ import annotations

import json

import torch


from .conftest import SAMPLES, assert_decompresses_like_qtool, digest, run_cli

ARGS = ["--calib", SAMPLES / "calib.txt", "--calib-samples", "8", "--seq-len", "64", "--quiet"]




def test_gptq_round_trip_determinism_and_report(tmp_path):
    for name in ("a", "b"):
        r = run_cli("quantize", SAMPLES / "tiny-llama", "-o", tmp_path / name, "--method", "gptq", "--asymmetric",
                    "--report", tmp_path / f"{name}.json", *ARGS)
        assert r.exit_code == 0, r.stderr
    assert digest(tmp_path / "a") == digest(tmp_path / "b")

    assert_decompresses_like_qtool(tmp_path / "a", torch.bfloat16)

    rep = json.loads((tmp_path / "a.json").read_text())
    quantized = [l for l in rep["layers"] if l["quantized"]]
    assert len(quantized) == 14 and rep["quantization"]["method"] == "gptq"
    for l in quantized:
        assert l["reason"] == "int4 asym group 128, gptq" and l["calibrated"] is True
        assert 0 < l["output_error_after"] < l["output_error_before"], l["name"]


def test_gptq_without_data_and_rtn_with_data_are_refused(tmp_path):
    r = run_cli("quantize", SAMPLES / "tiny-llama", "-o", tmp_path / "q", "--method", "gptq")
    assert r.exit_code == 1 and "needs calibration data" in r.stderr
    r = run_cli("quantize", SAMPLES / "tiny-llama", "-o", tmp_path / "q", "--method", "rtn", "--calib", SAMPLES / "calib.txt")
    assert r.exit_code == 1 and "uses no calibration data" in r.stderr
    assert not (tmp_path / "q").exists()
