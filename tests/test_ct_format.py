"""compress()/decompress()/quantization_config() against compressed-tensors' own code."""
import json

import pytest
import torch

from qtool.errors import QtoolError
from qtool.formats import compressed_tensors as ctf
from qtool.quant import core, minmax_qparams
from qtool.quant.spec import QuantSpec

ctq = pytest.importorskip("compressed_tensors.quantization")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402

CASES = [(b, s, g) for b in (4, 8) for s in (True, False) for g in (32, -1, 0)]


def scheme_of(spec):
    w = ctf.weights_args(spec)
    return ctq.QuantizationScheme(targets=["Linear"], weights=ctq.QuantizationArgs(**w), format="pack-quantized")


@pytest.mark.parametrize("bits,sym,gs", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ct_decompresses_our_output(bits, sym, gs, dtype):
    g = torch.Generator().manual_seed(bits * 10 + gs)
    w = (torch.randn(40, 96, generator=g) * 0.02).to(dtype)  # 40 rows: zero points straddle words
    spec = QuantSpec(bits, sym, gs, "rtn")
    scale, zp = minmax_qparams(w, spec)
    q = core.quantize(w, scale, zp, spec)
    tensors = ctf.compress("model.layers.0.mlp.down_proj", q, scale, zp, spec, w.shape)
    planned = ctf.compressed_specs("model.layers.0.mlp.down_proj", w.shape, dtype, spec)
    assert [(n, tuple(t.shape), t.dtype) for n, t in sorted(tensors.items())] == planned
    local = {n.rsplit(".", 1)[1]: t for n, t in tensors.items()}
    assert set(local) == set(ctf.module_param_names(spec))
    if not sym and gs != 0:
        assert local["weight_zero_point"].shape == (-(-40 * bits // 32), scale.shape[1])
    ours = ctf.decompress(local, spec)
    expected = core.dequantize(q, scale, zp, spec)
    assert ours.dtype == dtype and torch.equal(ours, expected)
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    theirs = compressor.decompress(dict(local), scheme_of(spec))["weight"]
    assert torch.equal(theirs.to(dtype), expected)


def test_tensor_names_and_shapes_match_reference_table():
    spec = QuantSpec(4, False, 128, "rtn")
    got = ctf.compressed_specs("m.q_proj", (256, 256), torch.bfloat16, spec)
    assert got == sorted([
        ("m.q_proj.weight_packed", (256, 32), torch.int32),
        ("m.q_proj.weight_scale", (256, 2), torch.bfloat16),
        ("m.q_proj.weight_shape", (2,), torch.int64),
        ("m.q_proj.weight_zero_point", (32, 2), torch.int32),
    ])
    got8 = ctf.compressed_specs("m.q_proj", (256, 256), torch.float16, QuantSpec(8, False, -1, "rtn"))
    assert ("m.q_proj.weight_zero_point", (64, 1), torch.int32) in got8
    assert ("m.q_proj.weight_packed", (256, 64), torch.int32) in got8


@pytest.mark.parametrize("bits,sym,gs", CASES)
def test_config_block_validates_in_ct_and_reads_back(bits, sym, gs):
    spec = QuantSpec(bits, sym, gs, "rtn")
    cfg = ctf.quantization_config(spec, ["lm_head"])
    dumped = json.loads(json.dumps(cfg, sort_keys=True))
    parsed = ctq.QuantizationConfig.model_validate(dumped)
    weights = parsed.config_groups["group_0"].weights
    assert weights.num_bits == bits and weights.symmetric == sym and weights.strategy == spec.strategy
    # CT serialises the args back to exactly what we wrote
    assert weights.model_dump(mode="json") == cfg["config_groups"]["group_0"]["weights"]
    assert cfg["provider"] == "qtool" and cfg["version"] == "0.20.1" and cfg["format"] == "pack-quantized"
    spec2, ignore, targets = ctf.spec_from_config(dumped)
    assert (spec2.bits, spec2.symmetric, spec2.group_size) == (bits, sym, gs)
    assert ignore == ["lm_head"] and targets == ["Linear"]


def test_reads_llm_compressor_style_config():
    cfg = {
        "config_groups": {"group_0": {"input_activations": None, "output_activations": None, "targets": ["Linear"],
                                      "weights": {"actorder": None, "block_structure": None, "dynamic": False,
                                                  "group_size": 128, "num_bits": 4, "observer": "minmax",
                                                  "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                                                  "type": "int"}}},
        "format": "pack-quantized", "global_compression_ratio": 2.17, "ignore": ["lm_head"],
        "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
        "version": "0.6.0.20240926",
    }
    spec, ignore, targets = ctf.spec_from_config(cfg)
    assert spec == QuantSpec(4, True, 128, "rtn")


@pytest.mark.parametrize("mutate,field", [
    (lambda c: c.update(format="int-quantized") or c["config_groups"]["group_0"].pop("format"), "format"),
    (lambda c: c["config_groups"]["group_0"]["weights"].update(type="float"), "weights.type"),
    (lambda c: c["config_groups"]["group_0"].update(input_activations={"num_bits": 8}), "input_activations"),
    (lambda c: c["config_groups"]["group_0"]["weights"].update(num_bits=3), "weights.num_bits"),
    (lambda c: c["config_groups"]["group_0"]["weights"].update(strategy="block"), "weights.strategy"),
    (lambda c: c.update(quant_method="gptq"), "quant_method"),
])
def test_refuses_other_schemes_naming_the_field(mutate, field):
    cfg = ctf.quantization_config(QuantSpec(4, True, 128, "rtn"), [])
    mutate(cfg)
    with pytest.raises(QtoolError) as e:
        ctf.spec_from_config(cfg, path="cfg.json")
    assert e.value.path == "cfg.json" and field in e.value.problem


def test_module_discovery():
    names = ["a.q.weight_packed", "a.q.weight_scale", "a.q.weight_shape", "a.norm.weight", "b.k.weight_packed"]
    assert ctf.quantized_modules(names) == ["a.q", "b.k"]
    assert ctf.is_quantized_module(["weight_packed", "weight_scale"])
    assert not ctf.is_quantized_module(["weight", "bias"])
    assert ctf.split_name("a.q.weight_zero_point") == ("a.q", "weight_zero_point")
    assert ctf.split_name("a.q.weight") is None


def test_decompress_reports_broken_module():
    spec = QuantSpec(4, True, 32, "rtn")
    w = torch.randn(8, 64)
    s, z = minmax_qparams(w, spec)
    t = {k.rsplit(".", 1)[1]: v for k, v in ctf.compress("m", core.quantize(w, s, z, spec), s, z, spec, w.shape).items()}
    with pytest.raises(QtoolError, match="missing weight_scale"):
        ctf.decompress({k: v for k, v in t.items() if k != "weight_scale"}, spec, name="m")
    with pytest.raises(QtoolError, match="weight_packed"):
        ctf.decompress({**t, "weight_packed": t["weight_packed"][:, :1]}, spec, name="m")
