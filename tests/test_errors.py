"""Every failure a user can cause: exit 1, one line `error: <path>: <problem>`, no traceback, no output left."""
from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from .conftest import llama_config, llama_state, run_cli, write_folder


def _raw_safetensors(path, header: dict | bytes, data: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _assert_error(args, path_part: str, problem: str, out=None):
    r = run_cli(*args)
    assert r.exit_code == 1, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and path_part in lines[0] and problem in lines[0], lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    if out is not None:
        assert not os.path.exists(out)
        assert not [p for p in os.listdir(os.path.dirname(out)) if ".qtool-tmp" in p]
    return lines[0]


def test_missing_path(tmp_path):
    _assert_error(["inspect", tmp_path / "nope"], "nope", "no such file or folder")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_error(["inspect", tmp_path / "empty"], "empty", "not a checkpoint")
    (tmp_path / "notes.txt").write_text("hello")
    _assert_error(["inspect", tmp_path / "notes.txt"], "notes.txt", "not a checkpoint")


@pytest.mark.parametrize("header,data,length,problem", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10_000, "runs past the end of the file"),
    (b"{not json", b"", None, "not valid JSON"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None, "past the end of the data"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
     b"\0" * 12, None, "overlap"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype 'Q4'"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "but its data offsets span 8 bytes"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "invalid data offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, None, "belong to no tensor"),
])
def test_corrupt_safetensors(tmp_path, header, data, length, problem):
    p = _raw_safetensors(tmp_path / "bad.safetensors", header, data, length)
    _assert_error(["inspect", p], "bad.safetensors", problem)
    _assert_error(["quantize", p, "-o", tmp_path / "out"], "bad.safetensors", problem, out=tmp_path / "out")


def test_too_short_file(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    _assert_error(["inspect", tmp_path / "short.safetensors"], "short.safetensors", "shorter than")


def test_index_with_missing_shard(tmp_path):
    p = write_folder(tmp_path / "m", llama_state(layers=1), llama_config(layers=1), shards=2)
    os.remove(p / "model-00002-of-00002.safetensors")
    _assert_error(["inspect", p], "model-00002-of-00002.safetensors", "missing")
    _assert_error(["quantize", p, "-o", tmp_path / "out"], "model-00002-of-00002.safetensors", "missing", out=tmp_path / "out")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_shard_outside_folder(tmp_path, shard):
    p = write_folder(tmp_path / "m", {"a": torch.zeros(2)})
    save_file({"a": torch.zeros(2)}, tmp_path / "outside.safetensors")
    (p / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
    _assert_error(["inspect", p], "model.safetensors.index.json", "outside the checkpoint folder")


def test_index_names_tensor_missing_from_shard(tmp_path):
    p = write_folder(tmp_path / "m", {"a": torch.zeros(2)})
    (p / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model.safetensors", "b": "model.safetensors"}}))
    _assert_error(["inspect", p], "model.safetensors", "tensor 'b' is listed in the index but missing")


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    for name, blob in (("evil.bin", {"w": torch.zeros(2), "x": _Payload(marker)}),):
        torch.save(blob, tmp_path / name)
        _assert_error(["inspect", tmp_path / name], name, "refusing to load: not a plain tensor checkpoint")
        _assert_error(["quantize", tmp_path / name, "-o", tmp_path / "out"], name, "refusing to load", out=tmp_path / "out")
    with open(tmp_path / "raw.pt", "wb") as f:  # a bare pickle, not torch's zip container
        pickle.dump(_Payload(marker), f)
    _assert_error(["inspect", tmp_path / "raw.pt"], "raw.pt", "")
    assert not marker.exists()


def test_pickle_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    _assert_error(["inspect", tmp_path / "list.pt"], "list.pt", "not a state dict")
    torch.save({"a": torch.zeros(2), "step": 3}, tmp_path / "mixed.pt")
    _assert_error(["inspect", tmp_path / "mixed.pt"], "mixed.pt", "entry 'step' is a int")


def test_hub_id_not_in_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _assert_error(["inspect", "nobody/nothing"], "nobody/nothing", "not found in the local hugging face cache")


def test_usage_error_exits_2(tmp_path):
    r = run_cli("quantize", tmp_path, "--bits", "3", "-o", tmp_path / "o")
    assert r.exit_code == 2
    r = run_cli("quantize", tmp_path)
    assert r.exit_code == 2 and "Missing option" in r.stderr
