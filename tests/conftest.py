"""Shared fixtures: tiny checkpoints made here with fixed seeds, and a CLI runner."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file of an output folder, by name (byte-identical reruns)."""
    return {p: hashlib.sha256((folder / p).read_bytes()).hexdigest() for p in sorted(os.listdir(folder))}


def assert_decompresses_like_qtool(folder: Path, dtype: torch.dtype) -> None:
    """compressed-tensors' own model-free decompression of `folder` equals qtool's DenseView, tensor for tensor."""
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer
    from qtool.checkpoint import open_checkpoint
    from qtool.formats.dense import DenseView
    sd = {}
    for f in folder.glob("*.safetensors"):
        sd.update(load_file(f))
    theirs = CompressedTensorsDequantizer(folder, dtype=dtype).process(sd)
    view = DenseView(open_checkpoint(folder))
    for name in view.names:
        assert torch.equal(theirs[name], view.get(name)), name


def run_cli(*args: str) -> Result:
    from qtool.cli import main
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return Result(r.exit_code, r.stdout, r.stderr)


def llama_state(hidden=128, inter=256, layers=2, vocab=96, dtype=torch.bfloat16, seed=0) -> dict[str, torch.Tensor]:
    """A Llama-shaped state dict with random weights (names as transformers writes them)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    sd = {"model.embed_tokens.weight": rnd(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=dtype),
          "lm_head.weight": rnd(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj, rows in (("q_proj", hidden), ("k_proj", hidden // 2), ("v_proj", hidden // 2), ("o_proj", hidden)):
            sd[p + f"self_attn.{proj}.weight"] = rnd(rows, hidden)  # 2 kv heads of 4: grouped-query attention
        sd[p + "mlp.gate_proj.weight"] = rnd(inter, hidden)
        sd[p + "mlp.up_proj.weight"] = rnd(inter, hidden)
        sd[p + "mlp.down_proj.weight"] = rnd(hidden, inter)
        sd[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
    return sd


def llama_config(hidden=128, inter=256, layers=2, vocab=96, dtype="bfloat16") -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": vocab, "tie_word_embeddings": False, "torch_dtype": dtype,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 128, "head_dim": hidden // 4}


def write_folder(path: Path, sd: dict, config: dict | None = None, shards: int = 1) -> Path:
    """A model folder as transformers writes it: one file, or `shards` files with an index."""
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(sd)
    if shards == 1:
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        per = -(-len(names) // shards)
        for i in range(shards):
            fn = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: sd[n] for n in names[i * per:(i + 1) * per]}
            save_file(part, path / fn, metadata={"format": "pt"})
            weight_map.update({n: fn for n in part})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture
def tiny_llama(tmp_path) -> Path:
    return write_folder(tmp_path / "tiny", llama_state(), llama_config())


@pytest.fixture
def tiny_llama_sharded(tmp_path) -> Path:
    p = write_folder(tmp_path / "tiny-sharded", llama_state(), llama_config(), shards=2)
    (p / "tokenizer.json").write_text('{"version": "1.0"}')
    return p


def packed_module(q: torch.Tensor, scale: torch.Tensor, zp, spec):
    """The compressed-tensors module of int8 codes q [out, in] with their scale and zero point: the tests' reference
    path (min-max scales → core.quantize → packing), independent of quantize_weight's."""
    from qtool.formats import compressed_tensors as ct
    from qtool.quant.pack import pack_int32
    from qtool.quant.weight import QuantizedWeight
    qw = QuantizedWeight(pack_int32(q, spec.bits), scale, zp, spec, tuple(q.shape), {}, {})
    return ct.PackedModule.from_weight(qw)


def decompress(parts: dict, spec) -> torch.Tensor:
    """The dense weight of one module's stored parts (local names), as qtool reads it."""
    from qtool.formats import compressed_tensors as ct
    return ct.PackedModule.from_parts(parts, spec).dequantize()


# -- torchrun (tests/test_distributed*.py) ---------------------------------------------------------------------
CALIB = ["--calib-samples", "6", "--seq-len", "32", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="session")
def dist_model(tmp_path_factory):
    """A tiny Llama built by transformers from a config, seed 0 (3 blocks, grouped-query attention), and beside it
    ids.safetensors: 6 windows of 32 token ids."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("dist") / "llama"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    ids = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(1))
    save_file({"input_ids": ids}, str(path.parent / "ids.safetensors"))
    return path


def torchrun(*args, nproc: int = 2, script: list[str] | None = None, env: dict | None = None):
    """`torchrun --standalone --nproc-per-node N -m qtool ARGS` (or a script), one thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           *(script or ["-m", "qtool"]), *map(str, args)]
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=600)
