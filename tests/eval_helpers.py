"""Tiny causal LMs with the sample tokenizer, perturbed copies, and the direct full-model computation that
`qtool eval` must equal: transformers runs each whole model on each window, the float32 logits come from its
final hidden states and head in one matrix, and every statistic is computed in float64 from them."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from .conftest import SAMPLES
from .test_calib_helpers import save_tiny

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
VOCAB = 1024  # the sample tokenizer's


def causal_lm(kind: str, folder: Path, tokenizer: bool = True) -> Path:
    """A tiny float32 Llama- or GPT-2-shaped causal LM (fixed seed) saved by transformers, with the sample tokenizer."""
    save_tiny(kind, folder, vocab=VOCAB)
    if tokenizer:
        for f in TOKENIZER_FILES:
            shutil.copy(SAMPLES / "tiny-llama" / f, folder / f)
    return folder


def perturbed(src: Path, dst: Path, scale: float = 0.02, seed: int = 7) -> Path:
    """A copy of SRC whose matrices carry relative noise of `scale`: a stand-in for a lossy model."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    for f in dst.glob("*.safetensors"):
        sd = load_file(f)
        for k, t in sd.items():
            if t.ndim == 2:
                sd[k] = (t.float() + scale * t.float().std() * torch.randn(t.shape, generator=g)).to(t.dtype)
        save_file(sd, f, metadata={"format": "pt"})
    return dst


def load_full(folder: Path, quantized: bool = False):
    from transformers import AutoModelForCausalLM
    kw = {}
    if quantized:
        from transformers.utils.quantization_config import CompressedTensorsConfig
        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(folder, **kw).eval()


@torch.no_grad()
def _logits(model, ids: torch.Tensor, own: bool = False) -> torch.Tensor:
    """float32 logits [n, L, vocab] of windows of one length from the whole model: its final hidden states times its
    head, one matmul; with `own`, the float32 model's own forward's logits (its logit post-processing included)."""
    if own:
        return model(input_ids=ids).logits.float()
    h = model.base_model(input_ids=ids).last_hidden_state
    head = model.get_output_embeddings()
    z = h.float() @ head.weight.float().T
    if head.bias is not None:
        z = z + head.bias.float()
    if h.dtype == torch.float32:  # the model's own logits are float32 too: they must be the same numbers
        torch.testing.assert_close(z, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    return z


def _by_length(windows: list[torch.Tensor]):
    """Windows grouped by length (one batch each, no padding), in order of first appearance."""
    groups: dict[int, list[torch.Tensor]] = {}
    for w in windows:
        groups.setdefault(len(w), []).append(w)
    return [torch.stack(g) for g in groups.values()]


def direct(model_dir: Path, windows: list[torch.Tensor], ref_dir: Path | None = None, quantized: bool = False,
           own: bool = False) -> dict:
    """ppl (and with a reference ref_ppl, ppl_ratio, kld stats, top1_agreement) computed directly."""
    model = load_full(model_dir, quantized)
    ref = load_full(ref_dir) if ref_dir is not None else None
    nll, nll_ref, kld, agree = [], [], [], []
    for ids in _by_length(windows):
        z = _logits(model, ids, own)[:, :-1].reshape(-1, model.config.vocab_size)
        y = ids[:, 1:].reshape(-1)
        lp = torch.log_softmax(z.double(), dim=-1)
        nll.append(-lp[torch.arange(len(y)), y])
        if ref is None:
            continue
        zr = _logits(ref, ids, own)[:, :-1].reshape(-1, model.config.vocab_size)
        lpr = torch.log_softmax(zr.double(), dim=-1)
        nll_ref.append(-lpr[torch.arange(len(y)), y])
        kld.append((lpr.exp() * (lpr - lp)).sum(-1))
        agree.append(z.argmax(-1) == zr.argmax(-1))
    out = {"ppl": float(torch.cat(nll).mean().exp()), "tokens": sum(len(w) for w in windows)}
    if ref is None:
        return out
    k = torch.cat(kld).numpy()
    out["ref_ppl"] = float(torch.cat(nll_ref).mean().exp())
    out["ppl_ratio"] = out["ppl"] / out["ref_ppl"]
    out["kld"] = {"mean": float(k.mean()), "median": float(np.quantile(k, 0.5)), "p90": float(np.quantile(k, 0.9)),
                  "p99": float(np.quantile(k, 0.99)), "max": float(k.max())}
    out["top1_agreement"] = float(torch.cat(agree).double().mean())
    return out


def assert_matches(report: dict, expected: dict) -> None:
    """ppl to 1e-5 relative, every KLD statistic to 1e-6 absolute, top-1 agreement exactly."""
    assert report["tokens"] == expected["tokens"]
    assert abs(report["ppl"] / expected["ppl"] - 1) < 1e-5, (report["ppl"], expected["ppl"])
    if "kld" not in expected:
        assert report["kld"] is None and report["ref_ppl"] is None and report["top1_agreement"] is None
        return
    assert abs(report["ref_ppl"] / expected["ref_ppl"] - 1) < 1e-5
    assert abs(report["ppl_ratio"] / expected["ppl_ratio"] - 1) < 1e-5
    for k, v in expected["kld"].items():
        assert abs(report["kld"][k] - v) < 1e-6, (k, report["kld"][k], v)
    assert report["top1_agreement"] == expected["top1_agreement"]


def windows_of(text_file: Path, seq_len: int) -> list[torch.Tensor]:
    """The test's own cut of a text file: tokenized whole without special tokens, consecutive windows."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(SAMPLES / "tiny-llama")
    ids = tok(text_file.read_text(), add_special_tokens=False)["input_ids"]
    cut = [torch.tensor(ids[i:i + seq_len]) for i in range(0, len(ids), seq_len)]
    return [w for w in cut if len(w) >= 2]


def compressed_by_compressed_tensors(src: Path, out: Path, symmetric: bool, group_size: int = 32) -> Path:
    """SRC quantized to int4 and saved by compressed-tensors' own code path, the one llm-compressor's save runs:
    apply_quantization_config, min-max qparams per group (calculate_qparams), ModelCompressor.compress_model,
    save_pretrained, update_config."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams
    model = load_full(src)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group_size)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]))
    for m in model.modules():
        if hasattr(m, "weight_scale"):
            g = m.weight.detach().reshape(m.weight.shape[0], -1, group_size)
            scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
            m.weight_scale.data.copy_(scale)
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.data.copy_(zp)
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    for f in TOKENIZER_FILES:
        shutil.copy(src / f, out / f)
    return out
