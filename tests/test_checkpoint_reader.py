"""Every source kind opens lazily and reads exact tensors."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from qtool.checkpoint import open_checkpoint
from qtool.errors import QtoolError

from .conftest import llama_config, llama_state, write_folder


def _same(ckpt, sd):
    assert list(ckpt.tensors) == sorted(sd)
    for name, t in sd.items():
        info = ckpt.tensors[name]
        assert info.shape == tuple(t.shape) and info.dtype == t.dtype and info.nbytes == t.numel() * t.element_size()
        assert torch.equal(ckpt.get(name), t)


def test_safetensors_folder_single_and_sharded(tmp_path):
    sd = llama_state()
    _same(open_checkpoint(write_folder(tmp_path / "a", sd, llama_config())), sd)
    sharded = open_checkpoint(write_folder(tmp_path / "b", sd, llama_config(), shards=3))
    _same(sharded, sd)
    assert len(sharded.files) == 3 and sharded.config["model_type"] == "llama"
    assert sharded.shard_of("lm_head.weight") == "model-00001-of-00003.safetensors"


def test_single_safetensors_file(tmp_path):
    sd = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "i": torch.tensor([1, 2], dtype=torch.int64)}
    save_file(sd, tmp_path / "x.safetensors")
    ckpt = open_checkpoint(tmp_path / "x.safetensors")
    _same(ckpt, sd)
    assert ckpt.config is None and ckpt.extra_files() == []


def test_pytorch_bin_single_sharded_and_pt(tmp_path):
    sd = llama_state(layers=1, dtype=torch.float16)
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model.bin")
    _same(open_checkpoint(folder), sd)

    sharded = tmp_path / "binsharded"
    sharded.mkdir()
    names = sorted(sd)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        fn = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({n: sd[n] for n in part}, sharded / fn)
        weight_map.update({n: fn for n in part})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _same(open_checkpoint(sharded), sd)

    torch.save(sd, tmp_path / "single.pt")
    _same(open_checkpoint(tmp_path / "single.pt"), sd)


def test_legacy_non_zip_pickle_still_loads(tmp_path):
    sd = {"a": torch.randn(4, 4)}
    torch.save(sd, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    _same(open_checkpoint(tmp_path / "old.bin"), sd)


def test_peft_adapter_folder(tmp_path):
    a = tmp_path / "adapter"
    a.mkdir()
    sd = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(8, 128),
          "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(128, 8)}
    save_file(sd, a / "adapter_model.safetensors")
    (a / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    ckpt = open_checkpoint(a)
    _same(ckpt, sd)
    assert ckpt.adapter_config["r"] == 8 and ckpt.storage == "safetensors"
    from qtool.report.size import listing
    assert listing(ckpt).format == "peft-adapter (safetensors)"


def test_hub_id_from_local_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    sd = llama_state(layers=1)
    write_folder(snap, sd, llama_config(layers=1))
    (cache / "models--acme--tiny" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny" / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    _same(open_checkpoint("acme/tiny"), sd)
    with pytest.raises(QtoolError, match="not found in the local hugging face cache"):
        open_checkpoint("acme/missing")


def test_listing_reads_no_tensor_data(tmp_path):
    """A header naming 4 GB of data opens instantly from a sparse file: only the header is read."""
    import struct
    n = 1 << 30
    header = json.dumps({"big": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]},
                         "small": {"dtype": "F32", "shape": [2], "data_offsets": [4 * n, 4 * n + 8]}}).encode()
    p = tmp_path / "big.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 4 * n + 8)
    ckpt = open_checkpoint(p)
    assert ckpt.tensors["big"].shape == (n,) and ckpt.tensors["big"].nbytes == 4 * n
    assert torch.equal(ckpt.get("small"), torch.zeros(2))  # reading one tensor leaves the other alone


def test_extra_files_skip_weights(tiny_llama_sharded):
    ckpt = open_checkpoint(tiny_llama_sharded)
    assert sorted(p.name for p in ckpt.extra_files()) == ["config.json", "tokenizer.json"]


def test_duplicate_tensor_across_files_is_an_error(tmp_path):
    d = tmp_path / "dup"
    d.mkdir()
    save_file({"a": torch.zeros(1)}, d / "x.safetensors")
    save_file({"a": torch.zeros(1)}, d / "y.safetensors")
    with pytest.raises(QtoolError, match="also in"):
        open_checkpoint(d)
