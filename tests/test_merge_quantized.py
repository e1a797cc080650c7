"""Merging onto a compressed-tensors pack-quantized base, checked against dequantize → merge → requantize done
by hand here (compressed-tensors' own unpack/pack, the PEFT formula in float32)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from .conftest import packed_module
from .lora_helpers import make_adapter, read_folder, save_base
from qtool.formats import compressed_tensors as ct
from qtool.jobs.merge import merge_lora
from qtool.quant import dequantize, minmax_qparams, quantize
from qtool.quant.spec import QuantSpec

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantized_base(dense: Path, out: Path, spec: QuantSpec, method: str | None) -> Path:
    """Quantize a dense base by hand (min-max codes, CT layout) into `out`."""
    out.mkdir()
    sd = read_folder(dense)
    stored = {}
    for name, w in sd.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEAR:
            scale, zp = minmax_qparams(w, spec)
            stored.update(packed_module(quantize(w, scale, zp, spec), scale, zp, spec).named(module))
        else:
            stored[name] = w
    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dense / "config.json").read_text())
    cfg["quantization_config"] = ct.Scheme.of(spec, ["lm_head"]).to_config()
    if method:
        cfg["quantization_config"]["qtool"] = {"method": method}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def by_hand(base_sd, adapter_dir, module, spec, qparams):
    """CT's unpack → (q - zp)·scale → + s·B@A in float32 → requantize in the scale dtype → CT's pack."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    ad = read_folder(adapter_dir)
    packed, scale = base_sd[f"{module}.weight_packed"], base_sd[f"{module}.weight_scale"]
    shape = torch.Size(base_sd[f"{module}.weight_shape"].tolist())
    q = unpack_from_int32(packed, spec.bits, shape).to(scale.dtype)
    zp = None
    if not spec.symmetric:
        zp = unpack_from_int32(base_sd[f"{module}.weight_zero_point"], spec.bits, scale.shape, packed_dim=0)
        q = q.view(shape[0], scale.shape[1], -1) - zp.to(scale.dtype).unsqueeze(-1)
    W = (q.view(shape[0], scale.shape[1], -1) * scale.unsqueeze(-1)).view(shape).float()
    A = ad[f"base_model.model.{module}.lora_A.weight"]
    B = ad[f"base_model.model.{module}.lora_B.weight"]
    merged = W + (B @ A) * (cfg["lora_alpha"] / cfg["r"])
    w = merged.to(scale.dtype)
    s2, z2 = qparams(w, spec)
    q2 = quantize(w, s2, z2, spec)
    out = {"weight_packed": pack_to_int32(q2, spec.bits), "weight_scale": s2}
    if z2 is not None:
        out["weight_zero_point"] = pack_to_int32(z2, spec.bits, packed_dim=0)
    return out, merged, dequantize(q2, s2, z2, spec, dtype=torch.float32), W


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("qbase")
    base = save_base("llama", root / "dense", torch.bfloat16)
    adapter = make_adapter("llama", base, root / "adapter", r=4, lora_alpha=8,
                           target_modules=["q_proj", "down_proj", "lm_head"])
    return root, base, adapter


@pytest.mark.parametrize("spec", [QuantSpec(4, True, 32, "rtn"), QuantSpec(8, False, -1, "rtn")],
                         ids=["int4_sym_g32", "int8_asym_channel"])
def test_quantized_base_rtn(dense, tmp_path, spec):
    root, dense_dir, adapter = dense
    base = quantized_base(dense_dir, tmp_path / "qbase", spec, "rtn")
    report = merge_lora(str(base), [str(adapter)], str(tmp_path / "out"))
    got, base_sd = read_folder(tmp_path / "out"), read_folder(base)
    assert set(got) == set(base_sd)
    rows = {r["name"]: r for r in report["layers"]}
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        want, merged, w_hat, W = by_hand(base_sd, adapter, module, spec, minmax_qparams)
        for local, t in want.items():
            assert torch.equal(got[f"{module}.{local}"], t), f"{module}.{local}"
        row = rows[f"{module}.weight"]
        rel = float((merged.double() - w_hat.double()).norm() / merged.double().norm())
        assert row["error"]["rel_error"] == pytest.approx(rel, rel=1e-5)
        assert row["delta_rel_norm"] == pytest.approx(float((merged - W).norm() / W.norm()), rel=1e-5)
        assert row["merged"] and row["quantized"]
    # modules the adapter does not touch: byte for byte
    for local in ("weight_packed", "weight_scale", "weight_shape"):
        n = f"model.layers.0.self_attn.k_proj.{local}"
        assert torch.equal(got[n], base_sd[n])
    # lm_head is not quantized (ignored): a plain merge
    assert got["lm_head.weight"].dtype == torch.bfloat16 and not torch.equal(got["lm_head.weight"], base_sd["lm_head.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"] == \
        json.loads((base / "config.json").read_text())["quantization_config"]


def test_quantized_base_default_mse(dense, tmp_path):
    from qtool.quant import mse_qparams
    root, dense_dir, adapter = dense
    spec = QuantSpec(4, True, 32, "mse")
    base = quantized_base(dense_dir, tmp_path / "qbase", spec, None)
    merge_lora(str(base), [str(adapter)], str(tmp_path / "out"))
    got, base_sd = read_folder(tmp_path / "out"), read_folder(base)
    module = "model.layers.0.self_attn.q_proj"
    want, *_ = by_hand(base_sd, adapter, module, spec, mse_qparams)
    for local, t in want.items():
        assert torch.equal(got[f"{module}.{local}"], t), local
