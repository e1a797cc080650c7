"""`qtool inspect`: figures computed independently from the safetensors files themselves."""
from __future__ import annotations

import json
import math

import torch
from safetensors import safe_open

from .conftest import llama_config, llama_state, run_cli, write_folder

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _expected(folder):
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                tensors[k] = (tuple(sl.get_shape()), sl.get_dtype())
    itemsize = {"BF16": 2, "F32": 4, "F16": 2}
    params = sum(math.prod(s) for s, _ in tensors.values())
    nbytes = sum(math.prod(s) * itemsize[d] for s, d in tensors.values())
    est = {"float32": 4 * params, "float16": 2 * params, "int8": 0, "int4": 0}
    for k, (s, _) in tensors.items():
        if k.split(".")[-2] in LINEAR:
            out, inp = s
            est["int8"] += out * inp + 2 * out + 16                       # int8 in int32 words, fp16 scale per row
            est["int4"] += out * inp // 2 + 2 * out * (inp // 128) + 16   # 8 nibbles a word, fp16 scale per 128
        else:
            est["int8"] += 2 * math.prod(s)
            est["int4"] += 2 * math.prod(s)
    return tensors, params, nbytes, est


def test_inspect_json_figures_are_exact(tiny_llama_sharded):
    r = run_cli("inspect", tiny_llama_sharded, "--json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)  # one JSON document and nothing else
    tensors, params, nbytes, est = _expected(tiny_llama_sharded)
    assert rep["tensors"] == len(tensors)
    assert rep["parameters"] == params
    assert rep["bytes"] == nbytes
    assert rep["bits_per_parameter"] == 16.0
    assert rep["dtypes"] == {"bfloat16": {"tensors": len(tensors), "parameters": params, "bytes": nbytes}}
    assert rep["estimates"] == est
    assert rep["quantization"] is None and rep["lora"] is None
    assert [l["name"] for l in rep["layers"]] == sorted(tensors)
    for key in ("qtool_version", "source", "format", "summary", "gate", "timing"):
        assert key in rep


def test_inspect_mixed_dtypes_and_pytorch_bin(tmp_path):
    sd = {"a.weight": torch.zeros(256, 128, dtype=torch.float32), "b.weight": torch.zeros(64, 128, dtype=torch.float16),
          "steps": torch.zeros(3, dtype=torch.int64)}
    (tmp_path / "m").mkdir()
    torch.save(sd, tmp_path / "m" / "pytorch_model.bin")
    rep = json.loads(run_cli("inspect", tmp_path / "m", "--json").stdout)
    assert rep["parameters"] == 256 * 128 + 64 * 128 + 3
    assert rep["bytes"] == 256 * 128 * 4 + 64 * 128 * 2 + 24
    assert rep["dtypes"]["float32"] == {"tensors": 1, "parameters": 256 * 128, "bytes": 256 * 128 * 4}
    assert rep["dtypes"]["int64"] == {"tensors": 1, "parameters": 3, "bytes": 24}
    assert rep["estimates"]["float32"] == (256 * 128 + 64 * 128) * 4 + 24
    assert rep["estimates"]["int4"] == (256 * 128 // 2 + 2 * 256 + 16) + (64 * 128 // 2 + 2 * 64 + 16) + 24


def test_inspect_table_and_top(tiny_llama):
    r = run_cli("inspect", tiny_llama, "--top", "3")
    assert r.exit_code == 0
    assert "largest 3 of" in r.stdout and "bits per parameter" in r.stdout and "16.000" in r.stdout
    assert "model.layers.0.mlp.down_proj.weight" in r.stdout  # among the largest, name not cut
    assert "model.norm.weight" not in r.stdout


def test_inspect_adapter_with_base(tmp_path):
    from safetensors.torch import save_file
    base = write_folder(tmp_path / "base", llama_state(), llama_config())
    a = tmp_path / "adapter"
    a.mkdir()
    sd = {}
    for proj in ("q_proj", "v_proj"):
        sd[f"base_model.model.model.layers.0.self_attn.{proj}.lora_A.weight"] = torch.zeros(8, 128)
        sd[f"base_model.model.model.layers.0.self_attn.{proj}.lora_B.weight"] = torch.zeros(128, 8)
    save_file(sd, a / "adapter_model.safetensors")
    (a / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 32, "use_rslora": True,
                                                       "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "../base"}))
    rep = json.loads(run_cli("inspect", a, "--json").stdout)
    base_params = sum(t.numel() for t in llama_state().values())
    lora = rep["lora"]
    assert lora["rank"] == 8 and lora["alpha"] == 32 and lora["targets"] == ["q_proj", "v_proj"]
    assert lora["scaling"] == 32 / math.sqrt(8)
    assert lora["parameters"] == 4 * 8 * 128
    assert lora["fraction_of_base"] == 4 * 8 * 128 / base_params
    rep2 = json.loads(run_cli("inspect", a, "--json", "--base", base).stdout)
    assert rep2["lora"]["fraction_of_base"] == lora["fraction_of_base"]


def test_lora_training_estimate_matches_the_live_model_accounting(tiny_llama):
    """The file-based estimate and qtool.nn.accounting agree on a model loaded from the same folder."""
    from transformers import AutoModelForCausalLM
    from qtool.nn.accounting import lora_training_memory
    rep = json.loads(run_cli("inspect", tiny_llama, "--json", "--lora-rank", "8").stdout)
    est = rep["lora_training"]
    per_layer = 8 * ((128 + 128) * 2 + (64 + 128) * 2 + (256 + 128) * 3)
    assert est["adapter_parameters"] == 2 * per_layer and est["targets"] == 14
    assert est["total_bytes"] == rep["bytes"] + 4 * 4 * est["adapter_parameters"]
    live = lora_training_memory(AutoModelForCausalLM.from_pretrained(tiny_llama), rank=8)
    assert live["adapter_parameters"] == est["adapter_parameters"] and live["targets"] == est["targets"]
    assert "LoRA fine-tune, rank 8" in run_cli("inspect", tiny_llama, "--lora-rank", "8").stdout


def test_json_honours_top(tiny_llama, tmp_path):
    """--top N sets the JSON's lists too (it was ignored there): `largest` names the N largest tensors by bytes and,
    against a reference, summary.worst the N worst by rel_error."""
    tensors, *_ = _expected(tiny_llama)
    itemsize = {"BF16": 2, "F32": 4, "F16": 2}
    by_bytes = sorted(tensors, key=lambda k: (-math.prod(tensors[k][0]) * itemsize[tensors[k][1]], k))
    for top in (0, 3, 7):
        rep = json.loads(run_cli("inspect", tiny_llama, "--json", "--top", str(top)).stdout)
        assert rep["largest"] == by_bytes[:top] and rep["kind"] == "inspect"
    assert run_cli("quantize", tiny_llama, "-o", tmp_path / "q", "--method", "rtn", "--group-size", "32",
                   "--quiet").exit_code == 0
    rep = json.loads(run_cli("inspect", tmp_path / "q", "--against", tiny_llama, "--json", "--top", "3").stdout)
    quantized = sorted((l for l in rep["layers"] if l["quantized"]), key=lambda l: -l["error"]["rel_error"])
    assert rep["summary"]["worst"] == [l["name"] for l in quantized[:3]] and len(rep["largest"]) == 3


def test_timing_written_once_rounded(tiny_llama, tmp_path):
    """Every job's timing comes from one builder, rounded to the millisecond (inspect --against and merge-lora
    wrote it unrounded)."""
    import qtool
    from qtool.report.schema import timing_part
    assert run_cli("quantize", tiny_llama, "-o", tmp_path / "q", "--group-size", "32", "--quiet").exit_code == 0
    reports = [qtool.inspect(str(tmp_path / "q"), against=str(tiny_llama)),
               qtool.quantize(str(tiny_llama), str(tmp_path / "q2"), qtool.QuantSpec(group_size=32)),
               qtool.dequantize(str(tmp_path / "q"), str(tmp_path / "d"))]
    for rep in reports:
        t = rep["timing"]
        assert set(t) == {"seconds", "input_gb_per_s", "processes"} and t["seconds"] == round(t["seconds"], 3) > 0
        assert t["processes"] == 1  # no torchrun
        assert t["input_gb_per_s"] == round(t["input_gb_per_s"], 3)
    assert timing_part(0.0, 10**9)["input_gb_per_s"] == round(timing_part(0.0, 10**9)["input_gb_per_s"], 3)


def test_the_training_estimate_is_one_builder(tiny_llama):
    """inspect --lora-rank and qtool.nn.lora_training_memory fill the same part (it was written twice): the same
    fields, the same arithmetic on the same layers."""
    from transformers import AutoModelForCausalLM
    from qtool.nn.accounting import lora_training_memory
    from qtool.report.lora import training_part
    est = json.loads(run_cli("inspect", tiny_llama, "--json", "--lora-rank", "4").stdout)["lora_training"]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    live = lora_training_memory(model, rank=4)
    assert list(est) == list(live) == list(training_part(4, [], 0))
    shapes = [(128, 128), (64, 128), (64, 128), (128, 128), (256, 128), (256, 128), (128, 256)] * 2
    config = json.loads((tiny_llama / "config.json").read_text())
    assert est == training_part(4, shapes, est["base_bytes"], config)
    assert live == training_part(4, shapes, live["base_bytes"], model.config.to_dict())
