"""The writer: exact bytes readable by safetensors, atomic, deterministic, never clobbering."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open

from qtool.checkpoint import CheckpointWriter, open_checkpoint
from qtool.errors import QtoolError


def _tensors():
    g = torch.Generator().manual_seed(1)
    return {"b.weight": torch.randn(5, 3, generator=g).to(torch.bfloat16), "a.idx": torch.arange(7, dtype=torch.int32),
            "c.bias": torch.randn(3, generator=g), "d.flag": torch.tensor([True, False])}


def _write(out, ts, **plan_kw):
    with CheckpointWriter(out, overwrite=plan_kw.pop("overwrite", False)) as w:
        w.plan([(k, v.shape, v.dtype) for k, v in sorted(ts.items())], **plan_kw)
        for k in reversed(sorted(ts)):  # out of order on purpose: the writer must put bytes in their place
            w.write(k, ts[k])
        w.write_json("config.json", {"z": 1, "a": 2})


def _digest(folder):
    return {p: hashlib.sha256((folder / p).read_bytes()).hexdigest() for p in sorted(os.listdir(folder))}


def test_single_and_sharded_round_trip(tmp_path):
    ts = _tensors()
    _write(tmp_path / "one", ts)
    assert sorted(os.listdir(tmp_path / "one")) == ["config.json", "model.safetensors"]
    with safe_open(tmp_path / "one" / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k in ts:
            assert torch.equal(f.get_tensor(k), ts[k])
    _write(tmp_path / "many", ts, max_shard_bytes=40)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ts.values())
    assert sorted(index["weight_map"]) == sorted(ts) and len(set(index["weight_map"].values())) > 1
    ckpt = open_checkpoint(tmp_path / "many")
    for k in ts:
        assert torch.equal(ckpt.get(k), ts[k])


def test_deterministic_bytes(tmp_path):
    ts = _tensors()
    _write(tmp_path / "x", ts, max_shard_bytes=40)
    _write(tmp_path / "y", ts, max_shard_bytes=40)
    assert _digest(tmp_path / "x") == _digest(tmp_path / "y")
    assert json.loads((tmp_path / "x" / "config.json").read_text()) == {"a": 2, "z": 1}


def test_failure_leaves_nothing(tmp_path):
    ts = _tensors()
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(tmp_path / "out") as w:
            w.plan([(k, v.shape, v.dtype) for k, v in sorted(ts.items())])
            w.write("a.idx", ts["a.idx"])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_unwritten_planned_tensor_fails_and_leaves_nothing(tmp_path):
    ts = _tensors()
    with pytest.raises(RuntimeError, match="never written"):
        with CheckpointWriter(tmp_path / "out") as w:
            w.plan([(k, v.shape, v.dtype) for k, v in sorted(ts.items())])
            w.write("a.idx", ts["a.idx"])
    assert os.listdir(tmp_path) == []


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_bytes(b"old")
    (tmp_path / "out" / "README.md").write_text("mine")
    with pytest.raises(QtoolError, match="already exists; pass --overwrite"):
        _write(tmp_path / "out", _tensors())
    assert (tmp_path / "out" / "README.md").read_text() == "mine"
    _write(tmp_path / "out", _tensors(), overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_overwrite_refuses_a_folder_holding_other_things(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_bytes(b"old")
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(QtoolError, match="holds 'keep.txt', which is not part of a checkpoint"):
        _write(tmp_path / "out", _tensors(), overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["keep.txt", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_read_only_destination(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that ignores permissions")
        with pytest.raises(QtoolError, match="cannot write here"):
            _write(ro / "out", _tensors())
    finally:
        ro.chmod(0o700)


def test_disk_full_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    """ENOSPC in the middle of a shard: a one-line error and no output (simulated: no small tmpfs here)."""
    import errno
    import qtool.checkpoint.writer as wmod

    real_pwrite = wmod._pwrite
    calls = []
    def full(fd, data, offset):  # every file write goes through _pwrite: the second one finds the disk full
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_pwrite(fd, data, offset)
    monkeypatch.setattr(wmod, "_pwrite", full)
    with pytest.raises(QtoolError, match="no space left on device"):
        _write(tmp_path / "out", _tensors())
    assert os.listdir(tmp_path) == []


def test_missing_parent_folders_are_created(tmp_path):
    _write(tmp_path / "a" / "b" / "out", _tensors())
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(QtoolError, match="is not a folder"):
        _write(tmp_path / "file" / "out", _tensors())


def test_sink_pieces_land_where_write_would_put_them(tmp_path):
    """A tensor streamed in pieces (pooled buffers and plain tensors, out of order) gives the same bytes as
    write(); more pieces than the pool holds wait for buffers to come back."""
    big = torch.randn(40, 16, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    ts = {**_tensors(), "e.big": big}
    _write(tmp_path / "ref", ts)
    with CheckpointWriter(tmp_path / "out") as w:
        w.plan([(k, v.shape, v.dtype) for k, v in sorted(ts.items())])
        for k in ts:
            if k != "e.big":
                w.write(k, ts[k])
        with w.sink("e.big") as out:
            rows = list(range(0, 40, 2))
            for r0 in reversed(rows):  # 20 pieces, last rows first
                piece = big[r0:r0 + 2].reshape(-1)
                if r0 % 4:
                    buf = out.buffer(piece.numel(), torch.bfloat16)
                    buf.copy_(piece)
                    piece = buf
                out.write(r0 * 16 * 2, piece)
        w.write_json("config.json", {"z": 1, "a": 2})
    assert _digest(tmp_path / "out") == _digest(tmp_path / "ref")


def test_sink_must_cover_its_tensor(tmp_path):
    with pytest.raises(RuntimeError, match="e.big: 64 of 128 bytes written"):
        with CheckpointWriter(tmp_path / "out") as w:
            w.plan([("e.big", (8, 8), torch.int16)])
            with w.sink("e.big") as out:
                out.write(0, torch.zeros(32, dtype=torch.int16))
    with pytest.raises(ValueError, match="fall outside"):
        with CheckpointWriter(tmp_path / "out2") as w:
            w.plan([("e.big", (8, 8), torch.int16)])
            with w.sink("e.big") as out:
                out.write(100, torch.zeros(32, dtype=torch.int16))
    assert os.listdir(tmp_path) == []
