"""The plain way to measure what a quantized model lost: load both whole models with transformers, run them on the
windows, compute the numbers `qtool eval` reports, print them as JSON.

    python bench/eval_plain.py MODEL REF DATA.safetensors [--seq-len 512] [--batch-size B]

MODEL is compressed-tensors pack-quantized, loaded with `CompressedTensorsConfig(dequantize=True)` (dense weights,
as transformers serves it without the compressed kernels); REF loads as stored. Per batch of windows (rows of
`input_ids`): both models' final hidden states (and every block's output, for the hidden errors), the float32
logits of each head as one [tokens, vocab] matrix, float32 log-softmax, NLL, KL(P_ref ‖ P_model), argmax. What
a careful user writes with transformers alone; bench/eval_bench.py runs it beside `qtool eval` and checks that the
numbers agree.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def load(folder: str, quantized: bool):
    from transformers import AutoModelForCausalLM
    kw = {}
    if quantized:
        from transformers.utils.quantization_config import CompressedTensorsConfig
        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(folder, **kw).eval()


@torch.no_grad()
def run(model, ids: torch.Tensor):
    """(each block's output, float32 logits [B·(L-1), vocab]) of one batch."""
    outputs = []
    # forward hooks on the blocks: transformers' hidden_states[-1] is the final norm's output, not the last block's
    hooks = [layer.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.base_model.layers]
    try:
        out = model.base_model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    head = model.get_output_embeddings()
    h = out.last_hidden_state[:, :-1].reshape(-1, out.last_hidden_state.shape[-1])
    return outputs, h.float() @ head.weight.float().T


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("ref")
    ap.add_argument("data")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    a = ap.parse_args(argv)
    from safetensors.torch import load_file
    t0 = time.perf_counter()
    ids = load_file(a.data)["input_ids"][:, : a.seq_len].long()
    model, ref = load(a.model, True), load(a.ref, False)
    nll, nll_ref, kld, agree = [], [], [], []
    diff = ref_sq = None
    for b0 in range(0, ids.shape[0], a.batch_size):
        x = ids[b0:b0 + a.batch_size]
        hm, zm = run(model, x)
        hr, zr = run(ref, x)
        if diff is None:
            diff, ref_sq = np.zeros(len(hr)), np.zeros(len(hr))
        for i, (m, r) in enumerate(zip(hm, hr)):
            diff[i] += float((m.float() - r.float()).square().sum())
            ref_sq[i] += float(r.float().square().sum())
        y = x[:, 1:].reshape(-1)
        lp, lpr = torch.log_softmax(zm, -1), torch.log_softmax(zr, -1)
        rows = torch.arange(len(y))
        nll.append(-lp[rows, y].double())
        nll_ref.append(-lpr[rows, y].double())
        kld.append(torch.nn.functional.kl_div(lp, lpr, log_target=True, reduction="none").sum(-1).double())
        agree.append(zm.argmax(-1) == zr.argmax(-1))
        del zm, zr, lp, lpr
    k = torch.cat(kld).numpy()
    ppl, ref_ppl = float(torch.cat(nll).mean().exp()), float(torch.cat(nll_ref).mean().exp())
    print(json.dumps({
        "tokens": int(ids.numel()), "ppl": ppl, "ref_ppl": ref_ppl, "ppl_ratio": ppl / ref_ppl,
        "kld": {"mean": float(k.mean()), "median": float(np.quantile(k, 0.5)), "p90": float(np.quantile(k, 0.9)),
                "p99": float(np.quantile(k, 0.99)), "max": float(k.max())},
        "top1_agreement": float(torch.cat(agree).double().mean()),
        "blocks": [{"index": i, "hidden_rel_error": float(np.sqrt(d / r))} for i, (d, r) in enumerate(zip(diff, ref_sq))],
        "seconds": time.perf_counter() - t0,
    }, indent=2))


if __name__ == "__main__":
    main()
