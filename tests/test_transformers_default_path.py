"""qtool's output through transformers' default loading path (compressed-tensors installed, no dequantize=True), for
every symmetric scheme, with tied and untied embeddings: it loads, runs compressed and gives the logits of the same
weights dequantized by qtool and loaded as a plain dense model. The method that wrote a checkpoint is recorded in
it, compressed-tensors' own config parser accepts the record, and merge-lora requantizes with that method."""
from __future__ import annotations

import json

import pytest
import torch

import qtool

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

SCHEMES = [(4, 32), (4, -1), (4, 0), (8, 32), (8, -1), (8, 0)]


def _tiny(folder, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, tie_word_embeddings=tied, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def source(request, tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("src") / "m", request.param), request.param


@pytest.mark.parametrize("bits,group", SCHEMES, ids=[f"int{b}-g{g}" for b, g in SCHEMES])
def test_default_from_pretrained_runs_the_packed_weights(source, tmp_path, bits, group):
    from transformers import AutoModelForCausalLM
    src, tied = source
    qtool.quantize(src, tmp_path / "q", qtool.QuantSpec(bits=bits, group_size=group, method="rtn"))
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qcfg["ignore"] == ["lm_head"]  # untied: kept dense by default; tied: not stored, tied on load
    qtool.dequantize(tmp_path / "q", tmp_path / "dense", dtype="float32")
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")  # the default path: runs compressed
    up = dict(model.model.layers[0].mlp.up_proj.named_parameters())
    assert "weight_packed" in up and "weight" not in up  # it runs from the packed codes
    assert "weight" in dict(model.lm_head.named_parameters())  # the head stays dense
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    with torch.no_grad():
        got, want = model(ids).logits.float(), ref(ids).logits.float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_method_is_recorded_and_merge_requantizes_with_it(source, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig
    from qtool.quant import minmax_qparams, mse_qparams
    from qtool.quant.spec import QuantSpec
    from .lora_helpers import make_adapter, read_folder
    from .test_merge_quantized import by_hand
    src, tied = source
    if tied:
        pytest.skip("one model is enough")
    adapter = make_adapter("llama", src, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    module = "model.layers.0.self_attn.q_proj"
    packed = {}
    for method, qparams in (("rtn", minmax_qparams), ("mse", mse_qparams)):
        base = tmp_path / method
        qtool.quantize(src, base, qtool.QuantSpec(bits=4, group_size=32, method=method))
        qcfg = json.loads((base / "config.json").read_text())["quantization_config"]
        assert qcfg["qtool"] == {"method": method}
        QuantizationConfig.model_validate(qcfg)  # compressed-tensors' own parser accepts the extra key
        assert qtool.inspect(base)["quantization"]["method"] == method
        report = qtool.merge_lora(base, [adapter], tmp_path / f"merged-{method}")
        row = next(r for r in report["layers"] if r["name"] == f"{module}.weight")
        assert row["reason"].startswith(f"LoRA merged, requantized with {method};")
        got = read_folder(tmp_path / f"merged-{method}")
        want, *_ = by_hand(read_folder(base), adapter, module, QuantSpec(4, True, 32, method), qparams)
        for local, t in want.items():
            assert torch.equal(got[f"{module}.{local}"], t), (method, local)
        packed[method] = got[f"{module}.weight_packed"]
        assert qtool.inspect(tmp_path / f"merged-{method}")["quantization"]["method"] == method
    assert not torch.equal(packed["rtn"], packed["mse"])  # the two methods do give different bytes here
