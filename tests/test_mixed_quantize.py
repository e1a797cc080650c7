"""Mixed precision end to end: `--scheme` rules, `--target-bits`/`--max-size` allocation, the config groups it writes,
and the consumers that read them (compressed-tensors, transformers' default path, qtool.load, dequantize,
merge-lora), on a tiny Llama built by transformers from a config with a fixed seed."""
from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import qtool
from qtool.formats import compressed_tensors as ct
from qtool.quant.spec import parse_spec

from .conftest import run_cli

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """Hidden 128 (every default candidate fits), two blocks; a few input channels of some layers scaled up, as
    trained models have them, so that layers differ in what they lose."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and any(k in name for k in LINEARS):
                p.mul_(torch.rand(p.shape[1], generator=g).pow(4).mul(8).add(0.5))  # heavy-tailed column scales
    folder = tmp_path_factory.mktemp("mixed") / "llama"
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _groups(folder: Path) -> dict[str, list[str]]:
    """{canonical SPEC: targets} of the written config groups."""
    from qtool.quant.spec import spec_text
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    scheme = ct.detect({"quantization_config": qcfg})
    return {spec_text(g.spec): list(g.targets) for g in scheme.groups}


def _modules(folder: Path) -> list[str]:
    return sorted(n.removesuffix(".weight") for n in _tensors(folder)
                  if n.endswith(".weight") and n.split(".")[-2] in LINEARS)


def test_rules_give_each_module_its_group_and_the_checkpoint_validates(llama, tmp_path):
    out = tmp_path / "rules"
    r = run_cli("quantize", llama, "-o", out, "--method", "rtn", "--scheme", "*.down_proj=int8",
                "--scheme", "model.layers.0.*=int4:g64", "--scheme", "*.o_proj=dense", "--report", tmp_path / "r.json")
    assert r.exit_code == 0, r.stderr
    modules = _modules(llama)
    want = {"int8:channel": [m for m in modules if m.endswith("down_proj")],
            "int4:g64": [m for m in modules if ".0." in m and not m.endswith("down_proj")],  # o_proj: rule 2 first
            "int4:g128": [m for m in modules if ".1." in m and not m.endswith(("down_proj", "o_proj"))]}
    assert _groups(out) == want  # first matching rule wins; each group names exactly its modules
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["ignore"] == ["lm_head", "model.layers.1.self_attn.o_proj"]
    from compressed_tensors.quantization import QuantizationConfig
    QuantizationConfig.model_validate(qcfg)
    rows = {row["name"]: row for row in json.loads((tmp_path / "r.json").read_text())["layers"]}
    assert rows["model.layers.1.mlp.down_proj.weight"]["scheme"] == "int8:channel"
    assert rows["model.layers.1.self_attn.o_proj.weight"]["scheme"] == "dense"
    assert "predicted_error" not in rows["model.layers.0.self_attn.q_proj.weight"]  # no budget, nothing predicted
    ins = json.loads(run_cli("inspect", out, "--json").stdout)["quantization"]["schemes"]
    assert {k: v["modules"] for k, v in ins.items()} == {k: len(v) for k, v in want.items()}
    assert math.isclose(sum(v["share"] for v in ins.values()), 1.0, abs_tol=1e-5)


@pytest.mark.parametrize("rule, group", [
    ("*.k_proj=int8", "model.layers.0.self_attn.{q_proj,k_proj,v_proj}"),
    ("model.layers.1.mlp.up_proj=int4:g32", "model.layers.1.mlp.{gate_proj,up_proj}"),
])
def test_a_rule_splitting_a_fused_group_is_refused(llama, tmp_path, rule, group):
    r = run_cli("quantize", llama, "-o", tmp_path / "out", "--scheme", rule)
    assert r.exit_code == 1 and not (tmp_path / "out").exists()
    assert r.stderr.startswith(f"error: --scheme '{rule}': splits the fused group {group} ")
    assert len(r.stderr.strip().splitlines()) == 1
    # the same rule on a budget (the group's other members are the allocation's) is refused as well
    r = run_cli("quantize", llama, "-o", tmp_path / "out", "--scheme", rule, "--target-bits", "6")
    assert r.exit_code == 1 and f"splits the fused group {group}" in r.stderr


def _stored_bits(folder: Path, modules: list[str]) -> Fraction:
    """8·(codes + scales + zero points, or dense bytes)/parameters over `modules`, from the file's tensors."""
    t = _tensors(folder)
    nbytes = params = 0
    for m in modules:
        if f"{m}.weight" in t:
            w = t[f"{m}.weight"]
            nbytes, params = nbytes + w.numel() * w.element_size(), params + w.numel()
            continue
        out, inp = t[f"{m}.weight_shape"].tolist()
        params += out * inp
        nbytes += sum(t[f"{m}.{p}"].numel() * t[f"{m}.{p}"].element_size()
                      for p in (ct.PACKED, ct.SCALE, ct.ZERO_POINT) if f"{m}.{p}" in t)
    return Fraction(8 * nbytes, params)


def test_target_bits_is_met_and_every_consumer_reads_the_result(llama, tmp_path):
    out = tmp_path / "b5"
    report = qtool.quantize(llama, out, qtool.QuantSpec(method="rtn"), target_bits=5.0)
    a = report["allocation"]
    modules = _modules(llama)
    bits = _stored_bits(out, modules)
    assert bits <= 5 and a["achieved_bits"] == float(bits) and a["target"] == 5.0
    assert a["achieved_bytes"] == sum(f.stat().st_size for f in out.iterdir())
    groups = _groups(out)
    assert len(groups) >= 2, groups  # the budget buys some modules more than others
    assert sorted(m for ms in groups.values() for m in ms) == modules == sorted(
        m for ms in a["by_spec"].values() for m in ms)
    spec_of = {m: s for s, ms in groups.items() for m in ms}
    for i in range(2):  # fused groups share one scheme
        p = f"model.layers.{i}."
        assert len({spec_of[p + f"self_attn.{x}"] for x in ("q_proj", "k_proj", "v_proj")}) == 1
        assert spec_of[p + "mlp.gate_proj"] == spec_of[p + "mlp.up_proj"]
    # rtn: the predicted error of each module is its actual ‖W − Ŵ‖², measured here from the two files
    src, dense = _tensors(llama), _dequantized(out, tmp_path)
    rows = {row["name"]: row for row in report["layers"]}
    for m in modules:
        want = float((src[f"{m}.weight"].float() - dense[f"{m}.weight"].float()).square().sum(dtype=torch.float64))
        assert rows[f"{m}.weight"]["predicted_error"] == pytest.approx(want, rel=1e-4)
    assert a["predicted_error"] == pytest.approx(sum(rows[f"{m}.weight"]["predicted_error"] for m in modules))
    # the choice minimised the groups' relative errors: each fused group's predicted errors over its ‖W‖² summed
    from qtool.arch import fused_groups
    relative = sum(sum(rows[f"{m}.weight"]["predicted_error"] for m in g.members) /
                   sum(float(src[f"{m}.weight"].double().square().sum()) for m in g.members)
                   for g in fused_groups(modules))
    assert a["sensitivity"] == "group" and a["solver"]["objective"] == pytest.approx(relative, rel=1e-6)
    _consumers_agree(out, dense, spec_of)


def _dequantized(out: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    qtool.dequantize(out, tmp_path / "dense")
    return _tensors(tmp_path / "dense")


def _consumers_agree(out: Path, dense: dict, spec_of: dict) -> None:
    """compressed-tensors decompresses what qtool dequantizes; transformers' default (compressed) load gives the
    dequantized model's logits; qtool.load gives every module its group's scheme."""
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer
    from compressed_tensors.quantization import QuantizationConfig
    QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    theirs = CompressedTensorsDequantizer(out, dtype=torch.bfloat16).process(_tensors(out))
    assert sorted(theirs) == sorted(dense) and all(torch.equal(theirs[k], dense[k]) for k in dense)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out)  # the strict default path, no dequantize=True
    ref = AutoModelForCausalLM.from_pretrained(out.parent / "dense")
    ids = torch.arange(24).reshape(2, 12) % 96
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    loaded = qtool.load(out)
    for m, s in spec_of.items():
        assert loaded.get_submodule(m).spec.bits == parse_spec(s).bits, m


def test_max_size_is_never_exceeded_and_reruns_give_the_same_bytes(llama, tmp_path):
    least = tmp_path / "least"
    qtool.quantize(llama, least, qtool.QuantSpec(method="rtn"), schemes=["*=int4:g128"])
    floor = sum(f.stat().st_size for f in least.iterdir())
    budget = floor + 60_000
    runs = []
    for name in ("a", "b"):
        r = run_cli("quantize", llama, "-o", tmp_path / name, "--max-size", str(budget), "--method", "rtn", "-q",
                    "--candidates", "int4:g128,int4:g32,int8:channel", "--report", tmp_path / f"{name}.json")
        assert r.exit_code == 0, r.stderr
        runs.append({f.name: f.read_bytes() for f in sorted((tmp_path / name).iterdir())})
    assert runs[0] == runs[1]  # the same command twice gives the same bytes
    size = sum(len(b) for b in runs[0].values())
    a = json.loads((tmp_path / "a.json").read_text())["allocation"]
    assert floor < size <= budget and a["achieved_bytes"] == size and a["target_kind"] == "bytes"
    assert a["candidates"] == ["int4:g128", "int4:g32", "int8:channel"] and len(a["by_spec"]) >= 2
    assert budget - size < 20_000  # the budget was spent, not left lying
    r = run_cli("quantize", llama, "-o", tmp_path / "c", "--max-size", str(floor - 1), "--method", "rtn")
    assert r.exit_code == 1 and f"smallest reachable checkpoint is {floor} bytes" in r.stderr


@pytest.mark.parametrize("args, code, says", [
    (["--target-bits", "4.1"], 1, "error: --target-bits 4.1: cannot be met: the smallest reachable average is 4.125"),
    (["--target-bits", "5", "--max-size", "1GB"], 2, "give --target-bits or --max-size, not both"),
    (["--scheme", "*.q_proj=int3"], 2, "'int3' is not a SPEC"),
    (["--scheme", "q_proj"], 2, "error: --scheme 'q_proj': is not GLOB=SPEC"),
    (["--candidates", "int4,int8"], 2, "give --target-bits or --max-size too"),
    (["--sensitivity", "proxy"], 2, "error: --sensitivity: is for an allocation to a budget"),
    (["--target-bits", "5", "--sensitivity", "output"], 2, "'output' is not one of"),
    (["--max-size", "1.5XB"], 2, "'1.5XB' is not a size"),
    (["--target-bits", "6", "--candidates", "int4:g128,int4:g96"], 2, "'g96' is not one of"),
    (["--scheme", "*.nothing=int8"], 1, "matches no tensor that is quantized"),
])
def test_bad_options_are_one_line(llama, tmp_path, args, code, says):
    r = run_cli("quantize", llama, "-o", tmp_path / "out", *args)
    assert r.exit_code == code and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_statistics_weigh_the_predicted_errors(llama, tmp_path):
    """With --calib STATS the predicted error of a module is Σ_j mean(x_j²)·‖ΔW_{:,j}‖² of the rtn rounding under
    its chosen SPEC (computed here from the statistics file and compressed-tensors' own rtn)."""
    from qtool.calib.stats import load_stats
    stats = tmp_path / "stats.safetensors"
    (tmp_path / "calib.txt").write_text("\n".join(f"sample {i} " * 5 for i in range(8)))
    ids = torch.arange(96).reshape(8, 12)
    from safetensors.torch import save_file
    save_file({"input_ids": ids}, tmp_path / "ids.safetensors")
    qtool.calibrate(llama, tmp_path / "ids.safetensors", stats, calib_samples=8, seq_len=12)
    report = qtool.quantize(llama, tmp_path / "out", calib=stats, target_bits=4.6, sensitivity="relative",
                            candidates=["int4:g128", "int4:g32", "int8:channel"])
    imp = load_stats(stats)
    src = _tensors(llama)
    from qtool.quant import quantize_weight
    relative = 0.0  # of each module (sensitivity="relative")
    for row in report["layers"]:
        if "predicted_error" not in row:
            continue
        m = row["name"].removesuffix(".weight")
        w = src[row["name"]]
        w_hat = quantize_weight(w, parse_spec(row["scheme"], method="rtn")).dequantize()
        want = float(((w.float() - w_hat.float()).square().sum(0) * imp[m]).sum(dtype=torch.float64))
        assert row["predicted_error"] == pytest.approx(want, rel=1e-4), m
        relative += want / float((w.double().square().sum(0) * imp[m].double()).sum())  # over its output energy
    assert report["allocation"]["achieved_bits"] <= 4.6
    assert report["allocation"]["solver"]["objective"] == pytest.approx(relative, rel=1e-4)
    proxy = qtool.quantize(llama, tmp_path / "proxy", calib=stats, target_bits=4.6, sensitivity="proxy",
                           candidates=["int4:g128", "int4:g32", "int8:channel"])["allocation"]
    assert proxy["sensitivity"] == "proxy" and proxy["solver"]["objective"] == pytest.approx(proxy["predicted_error"])
    group = qtool.quantize(llama, tmp_path / "group", calib=stats, target_bits=4.6,  # the default sensitivity
                           candidates=["int4:g128", "int4:g32", "int8:channel"])
    from qtool.arch import fused_groups
    pred = {row["name"].removesuffix(".weight"): row["predicted_error"] for row in group["layers"]
            if "predicted_error" in row}
    energy = {m: float((src[f"{m}.weight"].double().square().sum(0) * imp[m].double()).sum()) for m in pred}
    want = sum(sum(pred[m] for m in g.members) / sum(energy[m] for m in g.members) for g in fused_groups(pred))
    assert group["allocation"]["sensitivity"] == "group"
    assert group["allocation"]["solver"]["objective"] == pytest.approx(want, rel=1e-4)
    # calibration data instead of the file: the same statistics from one pass of the model, the same allocation;
    # then mse quantizes in the layer walk, as a run with those schemes as --scheme rules does: the same bytes
    again = qtool.quantize(llama, tmp_path / "again", calib=tmp_path / "ids.safetensors", calib_samples=8, seq_len=12,
                           target_bits=4.6, sensitivity="relative", candidates=["int4:g128", "int4:g32", "int8:channel"])
    assert again["allocation"] == {**report["allocation"], "achieved_bytes": again["allocation"]["achieved_bytes"]}
    rules = [f"{m}={spec}" for spec, mods in report["allocation"]["by_spec"].items() for m in mods]
    ruled = qtool.quantize(llama, tmp_path / "ruled", calib=tmp_path / "ids.safetensors", calib_samples=8, seq_len=12,
                           schemes=rules)
    walked = [r for r in again["layers"] if r.get("output_error_after") is not None]  # measured in the walk
    assert len(walked) == sum(len(v) for k, v in report["allocation"]["by_spec"].items() if k != "dense")
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "ruled" / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "model.safetensors").read_bytes() != (tmp_path / "out" / "model.safetensors").read_bytes()
    # gptq quantizes the allocated schemes in its layer walk
    g = qtool.quantize(llama, tmp_path / "gptq", qtool.QuantSpec(method="gptq"), calib=tmp_path / "ids.safetensors",
                       calib_samples=8, seq_len=12, target_bits=4.6, candidates=["int4:g128", "int4:g32", "int8:channel"],
                       sensitivity="relative")
    assert g["allocation"]["by_spec"] == report["allocation"]["by_spec"]
    assert _groups(tmp_path / "gptq") == {k: v for k, v in report["allocation"]["by_spec"].items() if k != "dense"}
    assert {row.get("method") for row in g["layers"] if row["quantized"]} == {"gptq"}


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_activation_aware_scaling_quantizes_the_allocated_schemes(llama, tmp_path, method):
    from safetensors.torch import save_file
    from .conftest import assert_decompresses_like_qtool
    save_file({"input_ids": torch.arange(96).reshape(8, 12)}, tmp_path / "ids.safetensors")
    kw = dict(calib=tmp_path / "ids.safetensors", calib_samples=8, seq_len=12, target_bits=4.6,
              candidates=["int4:g128", "int4:g32", "int8:channel"])
    mse = qtool.quantize(llama, tmp_path / "mse", **kw)
    r = qtool.quantize(llama, tmp_path / "out", qtool.QuantSpec(method=method), **kw)
    # the same statistics choose the same schemes; the walk then scales and quantizes each with its own
    assert r["allocation"]["by_spec"] == mse["allocation"]["by_spec"] and r["allocation"]["achieved_bits"] <= 4.6
    assert _groups(tmp_path / "out") == {k: v for k, v in r["allocation"]["by_spec"].items() if k != "dense"}
    rows = [row for row in r["layers"] if row["quantized"]]
    assert {row["method"] for row in rows} == {method.split("+")[-1] if "+" in method else "mse"}
    assert r["awq"]["mappings"] and any(row.get("awq") for row in rows)
    assert_decompresses_like_qtool(tmp_path / "out", torch.float32)


def test_the_python_api_names_its_own_arguments(llama, tmp_path):
    with pytest.raises(qtool.ArgumentError, match="give target_bits or max_size, not both"):
        qtool.quantize(llama, tmp_path / "out", target_bits=5, max_size=10**6)
    with pytest.raises(qtool.ArgumentError, match="'int3' is not a SPEC"):
        qtool.quantize(llama, tmp_path / "out", schemes=["*=int3"])
    with pytest.raises(qtool.ArgumentError, match="sensitivity: 'output' is not one of 'group', 'relative', 'proxy'"):
        qtool.quantize(llama, tmp_path / "out", target_bits=5, sensitivity="output")
    with pytest.raises(qtool.ArgumentError, match="give target_bits or max_size too"):
        qtool.quantize(llama, tmp_path / "out", sensitivity="relative")
    with pytest.raises(qtool.QtoolError, match="cannot be met") as e:
        qtool.quantize(llama, tmp_path / "out", target_bits=4, candidates="int4:g128,int8:channel")
    assert e.value.path == "target_bits=4" and not (tmp_path / "out").exists()


def test_merge_lora_onto_a_mixed_base_keeps_each_modules_scheme(llama, tmp_path):
    from .lora_helpers import make_adapter
    base = tmp_path / "base"
    qtool.quantize(llama, base, qtool.QuantSpec(method="rtn"), schemes=["*.down_proj=int8", "*.o_proj=int4:g32"])
    adapter = make_adapter("llama", llama, tmp_path / "adapter", r=4, lora_alpha=8,
                           target_modules=["q_proj", "k_proj", "v_proj", "down_proj", "o_proj"])
    r = run_cli("merge-lora", base, adapter, "-o", tmp_path / "merged", "-q")
    assert r.exit_code == 0, r.stderr
    assert _groups(tmp_path / "merged") == _groups(base)
    merged, before = _tensors(tmp_path / "merged"), _tensors(base)
    for m in _modules(llama):
        assert merged[f"{m}.weight_scale"].shape == before[f"{m}.weight_scale"].shape, m
        changed = not torch.equal(merged[f"{m}.weight_packed"], before[f"{m}.weight_packed"])
        assert changed == m.endswith(("q_proj", "k_proj", "v_proj", "down_proj", "o_proj")), m
