"""Accounting of live models: parameters, bytes by dtype (QuantLinear at packed size), LoRA fine-tune memory."""
from __future__ import annotations

import warnings

import torch

from qtool.checkpoint import open_checkpoint
from qtool.jobs.quantize import quantize
from qtool.nn import QuantLinear, attach_adapter, load, lora_training_memory, memory_footprint, parameter_counts
from qtool.quant.spec import QuantSpec

from .lora_helpers import BUILDERS, make_adapter, save_base

warnings.filterwarnings("ignore")


def test_counts_and_footprint_of_a_quantized_model(tmp_path):
    base = save_base("llama", tmp_path / "base", torch.bfloat16)
    quantize(str(base), str(tmp_path / "q"), QuantSpec(4, True, 32, "rtn"), device="cpu")
    dense, model = BUILDERS["llama"](), load(tmp_path / "q")
    counts = parameter_counts(model)
    linears = sum(m.weight.numel() for n, m in dense.named_modules()
                  if isinstance(m, torch.nn.Linear) and n != "lm_head")
    assert counts["total"] == sum(p.numel() for p in dense.parameters())
    assert counts["quantized"] == linears
    assert counts["trainable"] == counts["total"] - linears  # embeddings, norms, lm_head stay parameters
    fp = memory_footprint(model)
    ckpt = open_checkpoint(tmp_path / "q")
    packed = sum(i.nbytes for n, i in ckpt.tensors.items() if n.rsplit(".", 1)[1].startswith("weight_"))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert sum(m.stored_nbytes for m in layers) == packed
    # held: the file's bytes plus, on the CPU int4 kernel, bf16 scale and zero per group of 32 columns
    extra = sum(m.out_features * m.in_features // 32 * 4 for m in layers if m.path.name == "cpu-int4")
    assert fp["dtypes"]["int4"] == {"tensors": 14, "parameters": linears, "bytes": packed + extra}
    plain = sum(i.nbytes for n, i in ckpt.tensors.items() if i.dtype == torch.bfloat16
                and not n.rsplit(".", 1)[1].startswith("weight_"))
    assert fp["dtypes"]["bfloat16"]["bytes"] == plain


def test_lora_training_memory_matches_peft_trainable_parameters(tmp_path):
    from peft import LoraConfig, get_peft_model
    base = save_base("llama", tmp_path / "base")
    model = load(base)
    mem = lora_training_memory(model, rank=8)
    trainable, _ = get_peft_model(BUILDERS["llama"](), LoraConfig(r=8, target_modules="all-linear")) \
        .get_nb_trainable_parameters()
    assert mem["adapter_parameters"] == trainable and mem["targets"] == 14
    assert mem["adapter_bytes"] == 4 * trainable == mem["gradient_bytes"]
    assert mem["optimizer_bytes"] == 2 * mem["adapter_bytes"]
    assert mem["base_bytes"] == memory_footprint(model)["bytes"]
    assert mem["total_bytes"] == mem["base_bytes"] + 4 * mem["adapter_bytes"]
    qkv = lora_training_memory(model, rank=2, targets=["q_proj", "v_proj"])
    assert qkv["adapter_parameters"] == 2 * 2 * ((32 + 32) + (32 + 16))  # 2 layers, v_proj out = 2 kv heads × 8
    # wrapping a layer in LoRALinear neither hides it from the count nor counts the adapter as base
    attach_adapter(model, make_adapter("llama", base, tmp_path / "ad", r=2, lora_alpha=2, target_modules=["q_proj"]))
    assert lora_training_memory(model, rank=8)["adapter_parameters"] == trainable


def _live_peak_of_a_step(model, tokens: int) -> int:
    """Peak of torch's live allocations during a second forward + backward + AdamW step (the first one made the
    Adam states), above what was held before it: the activations and the adapter's gradients."""
    from torch.profiler import ProfilerActivity, profile
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    model.train()
    for step in range(2):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, nb in events:
        cur += nb
        peak = max(peak, cur)
    return peak


def test_training_step_memory_matches_the_estimate(tmp_path):
    """`qtool inspect --lora-rank R --lora-tokens T` against QLoRA steps on the int4 sample model: what a step
    adds to the held model, adapter and Adam states (torch's live tensor peak: activations and gradients) is
    the estimate's activation and gradient bytes within 15 %."""
    from qtool.jobs.inspect import inspect
    from qtool.nn import add_adapter
    from tests.conftest import SAMPLES
    quantize(str(SAMPLES / "tiny-llama"), str(tmp_path / "q"), QuantSpec(4, True, 128, "rtn"), device="cpu")
    tokens = 512
    est = inspect(str(tmp_path / "q"), lora_rank=16, lora_tokens=tokens)["lora_training"]
    model = load(tmp_path / "q")
    add_adapter(model, r=16, alpha=32, targets="all-linear")
    live = lora_training_memory(model, rank=16, tokens=tokens)
    assert {k: live[k] for k in ("activation_bytes", "adapter_parameters", "targets")} == \
        {k: est[k] for k in ("activation_bytes", "adapter_parameters", "targets")}
    assert est["activation_bytes"] == tokens * est["activation_bytes_per_token"] > 0
    assert est["total_bytes"] == est["base_bytes"] + 4 * est["adapter_bytes"] + est["activation_bytes"]
    added = est["activation_bytes"] + est["gradient_bytes"]
    measured = _live_peak_of_a_step(model, tokens)
    assert abs(measured / added - 1) < 0.15, (measured, added)
