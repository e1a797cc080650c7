"""A compressed-tensors checkpoint with one config group per scheme (what mixed precision writes): qtool reads every
module with its own group's scheme, and compressed-tensors' own dequantizer reads the same weights. (transformers'
`dequantize=True` path reads one scheme for every dense layer, so it cannot read such a checkpoint: it is not the
reference here.)"""
import json

import torch
from safetensors.torch import load_file, save_file

from qtool import arch
from qtool.formats import compressed_tensors as ct
from qtool.quant import QuantSpec, quantize_weight

from .conftest import llama_config, llama_state, run_cli

INT4, INT8 = QuantSpec(4, False, 32, "rtn"), QuantSpec(8, True, -1, "rtn")


def _mixed(tmp_path):
    sd, cfg = llama_state(), llama_config()
    specs = {arch.module_of(n): INT8 if "down_proj" in n else INT4 for n, t in sd.items()
             if arch.role(n, tuple(t.shape), t.dtype, cfg).quantize}
    stored = {}
    for name, t in sd.items():
        module = arch.module_of(name)
        if module in specs:
            stored.update(ct.PackedModule.from_weight(quantize_weight(t, specs[module])).named(module))
        else:
            stored[name] = t
    out = tmp_path / "mixed"
    out.mkdir()
    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})
    cfg["quantization_config"] = ct.Scheme.of(specs, ["lm_head"]).to_config()
    (out / "config.json").write_text(json.dumps(cfg))
    return out, sd, specs


def test_each_module_reads_with_its_own_group(tmp_path):
    out, sd, specs = _mixed(tmp_path)
    assert len(set(specs.values())) == 2
    r = run_cli("dequantize", out, "-o", tmp_path / "dense")
    assert r.exit_code == 0, r.stderr
    assert "largest 10 of" in r.stdout and "worst" not in r.stdout  # render dispatches on the report's kind
    dense = load_file(tmp_path / "dense" / "model.safetensors")
    for module, spec in specs.items():
        want = quantize_weight(sd[f"{module}.weight"], spec).dequantize()
        assert torch.equal(dense[f"{module}.weight"], want), module
    # the dense view reads like a checkpoint of the dequantized model (what a layer walk of a quantized model uses)
    from qtool.checkpoint import open_checkpoint
    from qtool.formats.dense import DenseView
    view = DenseView(open_checkpoint(out))
    assert list(view.tensors) == sorted(dense)
    for n, t in dense.items():
        info = view.tensors[n]
        assert (tuple(info.shape), info.dtype, info.nbytes) == (tuple(t.shape), t.dtype, t.numel() * t.element_size())
        assert torch.equal(view.get(n), t), n
    assert "schemes differ by module" in run_cli("inspect", out).stdout
    rep = json.loads(run_cli("inspect", out, "--json").stdout)
    dtypes = {row["name"]: row["dtype"] for row in rep["layers"]}
    assert all(dtypes[f"{m}.weight"] == ("int8" if "down_proj" in m else "int4") for m in specs)
    assert rep["quantization"]["bits"] is None and rep["format"] == "compressed-tensors pack-quantized (safetensors)"
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer
    theirs = CompressedTensorsDequantizer(out, dtype=torch.bfloat16).process(load_file(out / "model.safetensors"))
    for module in specs:
        assert torch.equal(theirs[f"{module}.weight"], dense[f"{module}.weight"]), module


def test_qtool_load_gives_each_module_its_scheme(tmp_path):
    from qtool.nn import QuantLinear, load
    out, sd, specs = _mixed(tmp_path)
    model = load(out)
    for module, spec in specs.items():
        layer = model.get_submodule(module)
        assert isinstance(layer, QuantLinear) and layer.spec == spec, module
        assert torch.equal(layer.dequantize(), quantize_weight(sd[f"{module}.weight"], spec).dequantize()), module
