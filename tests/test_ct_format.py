"""The packed-module type, its layout and the quantization_config block against compressed-tensors' own code."""
import json

import pytest
import torch

from qtool.errors import QtoolError
from qtool.formats import compressed_tensors as ctf
from qtool.quant import core, minmax_qparams
from qtool.quant.spec import QuantSpec

from .conftest import packed_module

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
    module = packed_module(q, scale, zp, spec)
    planned = ctf.layout(w.shape, spec, dtype)
    assert {n: (tuple(t.shape), t.dtype) for n, t in module.parts.items()} == planned and list(module.parts) == list(planned)
    local = module.parts
    assert set(local) == {"weight_packed", "weight_scale", "weight_shape"} | (set() if sym else {"weight_zero_point"})
    if not sym and gs != 0:
        assert local["weight_zero_point"].shape == (-(-40 * bits // 32), scale.shape[1])
    assert set(module.named("model.layers.0.mlp.down_proj")) == {f"model.layers.0.mlp.down_proj.{n}" for n in local}
    assert module.nbytes == sum(t.numel() * t.element_size() for t in local.values())
    assert torch.equal(module.codes(), q)
    assert (zp is None and module.zero_point() is None) or torch.equal(module.zero_point(), zp.reshape(scale.shape))
    ours = ctf.PackedModule.from_parts(dict(local), spec).dequantize()
    expected = core.dequantize(q, scale, zp, spec)
    assert ours.dtype == dtype and torch.equal(ours, expected)
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    theirs = compressor.decompress(dict(local), scheme_of(spec))["weight"]
    assert torch.equal(theirs.to(dtype), expected)


def test_tensor_names_and_shapes_match_reference_table():
    spec = QuantSpec(4, False, 128, "rtn")
    got = ctf.layout((256, 256), spec, torch.bfloat16)
    assert list(got.items()) == [
        ("weight_packed", ((256, 32), torch.int32)),
        ("weight_scale", ((256, 2), torch.bfloat16)),
        ("weight_shape", ((2,), torch.int64)),
        ("weight_zero_point", ((32, 2), torch.int32)),
    ]
    got8 = ctf.layout((256, 256), QuantSpec(8, False, -1, "rtn"), torch.float16)
    assert got8["weight_zero_point"] == ((64, 1), torch.int32) and got8["weight_packed"] == ((256, 64), torch.int32)
    assert ctf.layout((256, 256), QuantSpec(4, False, 0, "rtn"), torch.float32)["weight_zero_point"] == ((1,), torch.int8)


@pytest.mark.parametrize("bits,sym,gs", CASES)
def test_config_block_validates_in_ct_and_reads_back(bits, sym, gs):
    spec = QuantSpec(bits, sym, gs, "rtn")
    cfg = ctf.Scheme.of(spec, ["lm_head"]).to_config()
    dumped = json.loads(json.dumps(cfg, sort_keys=True))
    parsed = ctq.QuantizationConfig.model_validate(dumped)
    weights = parsed.config_groups["group_0"].weights
    assert weights.num_bits == bits and weights.symmetric == sym and weights.strategy == spec.strategy
    # CT serialises the args back to exactly what we wrote
    assert weights.model_dump(mode="json") == cfg["config_groups"]["group_0"]["weights"]
    assert cfg["provider"] == "qtool" and cfg["version"] == "0.20.1" and cfg["format"] == "pack-quantized"
    scheme = ctf.detect({"quantization_config": dumped})
    assert scheme.uniform == spec and scheme.spec_for("model.layers.0.mlp.up_proj") == spec
    assert scheme.ignore == ("lm_head",) and scheme.groups[0].targets == ("Linear",) and scheme.spec_for("lm_head") is None


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
    scheme = ctf.detect({"quantization_config": cfg})
    assert scheme.uniform == QuantSpec(4, True, 128, "rtn") and scheme.provider is None


@pytest.mark.parametrize("mutate,field", [
    (lambda c: c.update(format="int-quantized") or c["config_groups"]["group_0"].pop("format"), "format"),
    (lambda c: c["config_groups"]["group_0"]["weights"].update(type="float"), "weights.type"),
    (lambda c: c["config_groups"]["group_0"].update(input_activations={"num_bits": 8}), "input_activations"),
    (lambda c: c["config_groups"]["group_0"]["weights"].update(num_bits=3), "weights.num_bits"),
    (lambda c: c["config_groups"]["group_0"]["weights"].update(strategy="block"), "weights.strategy"),
    (lambda c: c.update(sparsity_config={"format": "sparse-24"}), "sparsity_config"),
    (lambda c: c["config_groups"].clear(), "config_groups"),
])
def test_refuses_other_schemes_naming_the_field(mutate, field):
    cfg = ctf.Scheme.of(QuantSpec(4, True, 128, "rtn"), []).to_config()
    mutate(cfg)
    with pytest.raises(QtoolError) as e:
        ctf.detect({"quantization_config": cfg}, path="cfg.json")
    assert e.value.path == "cfg.json" and field in e.value.problem


def test_other_quant_methods_are_not_compressed_tensors():
    cfg = ctf.Scheme.of(QuantSpec(4, True, 128, "rtn"), []).to_config()
    cfg["quant_method"] = "gptq"
    assert ctf.detect({"quantization_config": cfg}) is None and ctf.quant_method({"quantization_config": cfg}) == "gptq"
    assert ctf.detect({"model_type": "llama"}) is None and ctf.detect(None) is None and ctf.quant_method({}) is None


def test_several_config_groups_each_module_its_scheme():
    """A checkpoint may carry one config group per scheme (mixed precision): every module gets the scheme of the group
    that targets it, by compressed-tensors' precedence (exact name, then re: pattern, then the Linear class). qtool
    writes one group per scheme, each naming exactly its modules."""
    int4, int8 = QuantSpec(4, True, 128, "rtn"), QuantSpec(8, True, -1, "rtn")
    specs = {"m.0.q_proj": int4, "m.0.k_proj": int4, "m.0.down_proj": int8, "m.1.q_proj": int4}
    scheme = ctf.Scheme.of(specs, ["lm_head"])
    cfg = scheme.to_config()
    assert [g["targets"] for g in cfg["config_groups"].values()] == [["m.0.k_proj", "m.0.q_proj", "m.1.q_proj"],
                                                                     ["m.0.down_proj"]]
    ctq.QuantizationConfig.model_validate(json.loads(json.dumps(cfg)))  # compressed-tensors accepts it
    back = ctf.detect({"quantization_config": cfg})
    assert back.uniform is None and {m: back.spec_for(m) for m in specs} == specs
    assert ctf.Scheme.of({"a": int8, "b": int8}, []).groups == (ctf.ConfigGroup("group_0", int8, ("a", "b")),)
    assert back.spec_for("m.2.q_proj") is None  # no catch-all: a module no group names has no scheme
    by_regex = ctf.detect({"quantization_config": {**cfg, "config_groups": {
        "group_0": {**cfg["config_groups"]["group_0"], "targets": ["Linear"]},
        "group_1": {**cfg["config_groups"]["group_1"], "targets": ["re:.*down_proj$", "m.0.q_proj"]}}}})
    assert by_regex.spec_for("m.1.down_proj") == int8 and by_regex.spec_for("m.0.q_proj") == int8
    assert by_regex.spec_for("m.1.q_proj") == int4


def test_module_discovery():
    names = ["a.q.weight_packed", "a.q.weight_scale", "a.q.weight_shape", "a.norm.weight", "b.k.weight_packed",
             "c.weight_scale"]
    assert ctf.packed_modules(names) == {"a.q": ["weight_packed", "weight_scale", "weight_shape"],
                                         "b.k": ["weight_packed"]}
    assert ctf.split_name("a.q.weight_zero_point") == ("a.q", "weight_zero_point")
    assert ctf.split_name("a.q.weight") is None


def test_decompress_reports_broken_module():
    spec = QuantSpec(4, True, 32, "rtn")
    w = torch.randn(8, 64)
    s, z = minmax_qparams(w, spec)
    t = packed_module(core.quantize(w, s, z, spec), s, z, spec).parts
    with pytest.raises(QtoolError, match="missing weight_scale"):
        ctf.PackedModule.from_parts({k: v for k, v in t.items() if k != "weight_scale"}, spec, name="m")
    with pytest.raises(QtoolError, match="m.weight_packed: is torch.int32 \\[8, 1\\]"):
        ctf.PackedModule.from_parts({**t, "weight_packed": t["weight_packed"][:, :1]}, spec, name="m")
    with pytest.raises(QtoolError, match="non-zero weight_zero_point"):
        ctf.PackedModule.from_parts({**t, "weight_zero_point": torch.ones(1, 2, dtype=torch.int32)}, spec, name="m")
