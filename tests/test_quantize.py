"""`qtool quantize` end to end, checked against the real consumers (compressed-tensors, transformers)."""
from __future__ import annotations

import hashlib
import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qtool.checkpoint import open_checkpoint
from qtool.formats.dense import DenseView

from .conftest import llama_config, llama_state, run_cli, write_folder

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _load_all(folder):
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def _quantize(src, out, *args, ok=0):
    r = run_cli("quantize", src, "-o", out, "--quiet", *args)
    assert r.exit_code == ok, (r.exit_code, r.stderr)
    return r


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("src") / "tiny", llama_state(), llama_config(), shards=2)


def _reference_rtn(w: torch.Tensor, bits: int, group: int, symmetric: bool):
    """The documented formulas (design §4, compressed-tensors' rule), computed independently of qtool."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out, inp = w.shape
    g = w.reshape(out, -1, group if group > 0 else inp)
    lo = torch.clamp(g.amin(-1), max=0)
    hi = torch.clamp(g.amax(-1), min=0)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2)
        zp = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale == 0, torch.finfo(w.dtype).eps, scale).to(w.dtype)
    if not symmetric:
        zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    q = torch.clamp(torch.round(g / scale.unsqueeze(-1) + zp.unsqueeze(-1).to(w.dtype)), qmin, qmax)
    return q.reshape(out, inp).to(torch.int8), scale, zp.to(torch.int8)


@pytest.mark.parametrize("bits,group,symmetric", [(4, 128, True), (4, 128, False), (8, -1, True), (8, -1, False), (4, -1, False)])
def test_rtn_is_bit_exact_with_the_documented_formulas(model_dir, tmp_path, bits, group, symmetric):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    args = ["--method", "rtn", "--bits", str(bits), "--group-size", str(group), "--symmetric" if symmetric else "--asymmetric"]
    _quantize(model_dir, tmp_path / "q", *args)
    out = _load_all(tmp_path / "q")
    src = _load_all(model_dir)
    for name, w in src.items():
        module = name[: -len(".weight")]
        if name.split(".")[-2] not in LINEAR:
            assert torch.equal(out[name], w)  # copied unchanged
            continue
        q, scale, zp = _reference_rtn(w, bits, group, symmetric)
        assert torch.equal(out[f"{module}.weight_packed"], pack_to_int32(q, bits)), name
        assert out[f"{module}.weight_scale"].dtype == torch.bfloat16
        assert torch.equal(out[f"{module}.weight_scale"], scale), name
        assert out[f"{module}.weight_shape"].tolist() == list(w.shape)
        if symmetric:
            assert f"{module}.weight_zero_point" not in out
        else:
            assert torch.equal(out[f"{module}.weight_zero_point"], pack_to_int32(zp, bits, packed_dim=0)), name


@pytest.mark.parametrize("args", [[], ["--asymmetric"], ["--bits", "8"], ["--bits", "8", "--asymmetric"],
                                  ["--group-size", "-1", "--asymmetric"], ["--group-size", "0"]])
def test_compressed_tensors_decompresses_to_qtools_weights(model_dir, tmp_path, args):
    """compressed-tensors' own model-free dequantizer gives exactly qtool's dequantized weights."""
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer
    from compressed_tensors.quantization import QuantizationConfig
    _quantize(model_dir, tmp_path / "q", *args)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(cfg)  # the written block validates
    assert cfg["provider"] == "qtool" and cfg["ignore"] == ["lm_head"]
    view = DenseView(open_checkpoint(tmp_path / "q"))
    theirs = CompressedTensorsDequantizer(tmp_path / "q", dtype=torch.bfloat16).process(_load_all(tmp_path / "q"))
    assert sorted(theirs) == view.names
    for name in view.names:
        assert torch.equal(theirs[name], view.get(name)), name


def test_transformers_loads_output_and_logits_match_qtools_dequantized_model(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig
    _quantize(model_dir, tmp_path / "q", "--asymmetric")
    assert run_cli("dequantize", tmp_path / "q", "-o", tmp_path / "dq", "--quiet").exit_code == 0
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization_config=CompressedTensorsConfig(dequantize=True),
                                                  dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "dq", dtype=torch.float32)  # no compressed-tensors involved
    assert "quantization_config" not in json.loads((tmp_path / "dq" / "config.json").read_text())
    with torch.no_grad():
        a, b = theirs(ids).logits, ours(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        c = dense(ids).logits
    assert not torch.equal(a, c)  # quantization did change the weights


def test_same_command_twice_gives_identical_bytes(model_dir, tmp_path):
    def digest(folder):
        return {p: hashlib.sha256((folder / p).read_bytes()).hexdigest() for p in sorted(os.listdir(folder))}
    _quantize(model_dir, tmp_path / "a", "--max-shard-size", "100KB")
    _quantize(model_dir, tmp_path / "b", "--max-shard-size", "100KB")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert "model.safetensors.index.json" in os.listdir(tmp_path / "a")


def test_mse_beats_rtn_and_never_loses_a_tensor(model_dir, tmp_path):
    rep = {}
    for m in ("rtn", "mse"):
        _quantize(model_dir, tmp_path / m, "--method", m, "--report", tmp_path / f"{m}.json")
        rep[m] = json.loads((tmp_path / f"{m}.json").read_text())
    assert rep["mse"]["summary"]["rel_error_mean"] < rep["rtn"]["summary"]["rel_error_mean"]
    rtn = {l["name"]: l["error"] for l in rep["rtn"]["layers"] if l["error"]}
    for l in rep["mse"]["layers"]:
        if l["error"]:
            assert l["error"]["rel_error"] <= rtn[l["name"]]["rel_error"] + 1e-12, l["name"]


def test_report_schema_and_errors_against_source(model_dir, tmp_path):
    _quantize(model_dir, tmp_path / "q", "--report", tmp_path / "r.json")
    rep = json.loads((tmp_path / "r.json").read_text())
    for key in ("qtool_version", "source", "format", "tensors", "parameters", "bytes", "bits_per_parameter", "dtypes",
                "estimates", "quantization", "lora", "layers", "summary", "gate", "timing"):
        assert key in rep
    src = open_checkpoint(model_dir)
    assert rep["parameters"] == sum(i.numel for i in src.tensors.values())
    q = rep["quantization"]
    assert (q["bits"], q["symmetric"], q["group_size"], q["method"], q["format"]) == (4, True, 128, "mse", "pack-quantized")
    assert q["ignored"] == ["lm_head"]
    view = DenseView(open_checkpoint(tmp_path / "q"))
    by_name = {l["name"]: l for l in rep["layers"]}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        w, w_hat = src.get(name).double(), view.get(name).double()
        rel = float((w - w_hat).norm() / w.norm())
        e = by_name[name]["error"]
        assert math.isclose(e["rel_error"], rel, rel_tol=1e-5)
        assert math.isclose(e["sqnr_db"], -20 * math.log10(rel), rel_tol=1e-5)
        assert by_name[name]["quantized"] and by_name[name]["dtype"] == "int4"
    assert by_name["model.embed_tokens.weight"]["reason"] == "embedding"
    assert by_name["lm_head.weight"]["quantized"] is False
    # inspect --against recomputes the same figures from the two folders
    r = run_cli("inspect", tmp_path / "q", "--against", model_dir, "--json")
    again = {l["name"]: l for l in json.loads(r.stdout)["layers"]}
    for name, l in by_name.items():
        if l["error"]:
            assert math.isclose(again[name]["error"]["rel_error"], l["error"]["rel_error"], rel_tol=1e-6)


def test_quality_gate_exits_3_after_writing(model_dir, tmp_path):
    r = _quantize(model_dir, tmp_path / "q", "--max-rel-error", "0.05", "--report", tmp_path / "r.json", ok=3)
    assert "quality gate failed" in r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["gate"]["passed"] is False and len(rep["gate"]["failed"]) == 14
    assert (tmp_path / "q" / "config.json").exists()
    _quantize(model_dir, tmp_path / "q8", "--bits", "8", "--max-rel-error", "0.05", "--report", tmp_path / "r8.json")
    assert json.loads((tmp_path / "r8.json").read_text())["gate"] == {"max_rel_error": 0.05, "passed": True, "failed": []}


def test_include_exclude_and_ignore_list(model_dir, tmp_path):
    _quantize(model_dir, tmp_path / "q", "--exclude", "*.mlp.*", "--include", "lm_head", "--exclude", "model.layers.1.self_attn.q_proj")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["ignore"] == sorted([f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("down_proj", "gate_proj", "up_proj")]
                                   + ["model.layers.1.self_attn.q_proj"])
    names = open_checkpoint(tmp_path / "q").tensors
    assert "lm_head.weight_packed" in names and "model.layers.0.mlp.up_proj.weight" in names
    assert "model.layers.1.self_attn.q_proj.weight" in names and "model.layers.1.self_attn.k_proj.weight_packed" in names


def test_tied_embeddings_reload_tied(tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig
    sd = llama_state()
    del sd["lm_head.weight"]
    cfg = dict(llama_config(), tie_word_embeddings=True)
    src = write_folder(tmp_path / "tied", sd, cfg)
    r = run_cli("quantize", src, "-o", tmp_path / "q", "--quiet", "--include", "lm_head")
    assert r.exit_code == 1 and "--include 'lm_head' matches no tensor" in r.stderr and "lm_head is tied" in r.stderr
    r = run_cli("quantize", src, "-o", tmp_path / "q", "--quiet")
    assert r.exit_code == 0, r.stderr
    out_cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert "lm_head" in out_cfg["quantization_config"]["ignore"]  # compressed-tensors must leave the tied head alone
    assert out_cfg["tie_word_embeddings"] is True
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization_config=CompressedTensorsConfig(dequantize=True))
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    src2 = write_folder(tmp_path / "tied2", sd, cfg)
    r = run_cli("quantize", src2, "-o", tmp_path / "q2", "--quiet", "--include", "lm_head")
    assert r.exit_code == 1 and "tied to the input embeddings" in r.stderr and not (tmp_path / "q2").exists()


def test_nan_weight_is_an_error_naming_the_tensor(tmp_path):
    sd = llama_state()
    sd["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    src = write_folder(tmp_path / "nan", sd, llama_config())
    r = run_cli("quantize", src, "-o", tmp_path / "q")
    assert r.exit_code == 1 and r.stderr.strip() == (
        "error: model.layers.1.mlp.up_proj.weight: has 1 NaN/Inf values; fix the source or pass --allow-nonfinite to keep it unquantized")
    assert not (tmp_path / "q").exists() and os.listdir(tmp_path) == ["nan"]
    _quantize(src, tmp_path / "q", "--allow-nonfinite", "--report", tmp_path / "r.json")
    names = open_checkpoint(tmp_path / "q").tensors
    assert "model.layers.1.mlp.up_proj.weight" in names and "model.layers.0.mlp.up_proj.weight_packed" in names
    assert "model.layers.1.mlp.up_proj" in json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["ignore"]


def test_group_size_that_does_not_divide(model_dir, tmp_path):
    r = run_cli("quantize", model_dir, "-o", tmp_path / "q", "--group-size", "96")
    assert r.exit_code == 1
    assert r.stderr.startswith("error: model.layers.0.mlp.down_proj.weight: input width 256 is not a multiple of group size 96")
    assert "--exclude" in r.stderr and not (tmp_path / "q").exists()


def test_existing_output_and_overwrite(model_dir, tmp_path):
    (tmp_path / "q").mkdir()
    r = run_cli("quantize", model_dir, "-o", tmp_path / "q")
    assert r.exit_code == 1 and "already exists; pass --overwrite" in r.stderr
    _quantize(model_dir, tmp_path / "q", "--overwrite")
    assert (tmp_path / "q" / "config.json").exists()


def test_cuda_requested_without_cuda_is_an_error(model_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = run_cli("quantize", model_dir, "-o", tmp_path / "q", "--device", "cuda")
    assert r.exit_code == 1 and "cuda" in r.stderr and not (tmp_path / "q").exists()


def test_read_only_output_location(model_dir, tmp_path, monkeypatch):
    """A read-only file system (simulated: root ignores permission bits) is one error line and no output."""
    import errno
    import tempfile
    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    r = run_cli("quantize", model_dir, "-o", tmp_path / "q")
    assert r.exit_code == 1 and r.stderr.strip() == f"error: {tmp_path}: cannot write here: Read-only file system"
    assert os.listdir(tmp_path) == []


def test_disk_full_mid_write_leaves_no_output(model_dir, tmp_path, monkeypatch):
    import errno
    import qtool.checkpoint.writer as wmod
    real_pwrite = wmod._pwrite
    written = []
    def fills_up(fd, data, offset):  # the disk fills after 50 kB
        written.append(data.numel() * data.element_size() if hasattr(data, "numel") else len(memoryview(data).cast("B")))
        if sum(written) > 50_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_pwrite(fd, data, offset)
    monkeypatch.setattr(wmod, "_pwrite", fills_up)
    r = run_cli("quantize", model_dir, "-o", tmp_path / "q")
    assert r.exit_code == 1 and "no space left on device" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_inspect_recognises_quantized_output(model_dir, tmp_path):
    _quantize(model_dir, tmp_path / "q", "--group-size", "0")
    rep = json.loads(run_cli("inspect", tmp_path / "q", "--json").stdout)
    q = rep["quantization"]
    assert q["bits"] == 4 and q["group_size"] == 0 and q["vllm_servable"] is False
    linear_params = 2 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 256 * 128)
    # per tensor: packed nibbles + one bf16 scale + the int64 shape, for each of the 14 linears
    assert q["bits_per_weight"] == round(8 * (linear_params // 2 + 14 * (2 + 16)) / linear_params, 4)
    text = run_cli("inspect", tmp_path / "q").stdout
    assert "vLLM will not serve it" in text


@pytest.mark.parametrize("group,servable", [(16, False), (32, True), (64, True), (128, True), (-1, True), (0, False)])
def test_vllm_servable_is_what_vllms_weight_only_kernels_take(model_dir, tmp_path, group, servable):
    r = _quantize(model_dir, tmp_path / "q", "--group-size", str(group), "--method", "rtn", "--json")
    assert json.loads(r.stdout)["quantization"]["vllm_servable"] is servable
    assert ("vLLM will not serve it" in run_cli("inspect", tmp_path / "q").stdout) is not servable


def test_dequantize_refuses_a_dense_checkpoint(model_dir, tmp_path):
    r = run_cli("dequantize", model_dir, "-o", tmp_path / "d")
    assert r.exit_code == 1 and "is not a compressed-tensors quantized checkpoint" in r.stderr


def test_api_int8_defaults_to_per_channel_like_the_cli(model_dir, tmp_path):
    """QuantSpec(bits=8) through the Python API writes the same bytes as `--bits 8` (the API used to get group 128)."""
    from qtool.jobs.quantize import quantize
    from qtool.quant.spec import QuantSpec
    _quantize(model_dir, tmp_path / "cli", "--bits", "8", "--method", "rtn")
    rep = quantize(str(model_dir), str(tmp_path / "api"), QuantSpec(bits=8, method="rtn"))
    assert rep["quantization"]["group_size"] == -1 and rep["kind"] == "quantize"
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "cli" / f).read_bytes() == (tmp_path / "api" / f).read_bytes(), f
