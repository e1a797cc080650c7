"""AWQ on one block (qtool.calib.awq): which mappings fold exactly (norm w / 1 + w, v → o, up → down), which are skipped
and why, and that folding the searched scales leaves the block's output unchanged."""
from types import SimpleNamespace

import pytest
import torch

from qtool.calib import awq as block_awq
from qtool.quant.awq import mse_quantizer
from qtool.quant.spec import QuantSpec

LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
             max_position_embeddings=64, head_dim=16)


def _model(kind: str, kv_heads: int = 2):
    import transformers as tf
    torch.manual_seed(0)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA, num_key_value_heads=kv_heads)), "model.layers"
    if kind == "gemma2":
        cfg = tf.Gemma2Config(**LLAMA, num_key_value_heads=kv_heads, sliding_window=16)
        return tf.Gemma2ForCausalLM(cfg), "model.layers"
    cfg = tf.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                        vocab_size=64, max_position_embeddings=64)
    return tf.BertModel(cfg), "encoder.layer"


GROUPS = {  # what the walk's LinearTaps finds: (feeder, member module paths)
    "llama": [("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
              (None, ["self_attn.o_proj"]), ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
              (None, ["mlp.down_proj"])],
    "gemma2": [("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
               (None, ["self_attn.o_proj"]), ("pre_feedforward_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
               (None, ["mlp.down_proj"])],
    "bert": [(None, ["attention.self.query", "attention.self.key", "attention.self.value"]),
             (None, ["attention.output.dense"]), ("attention.output.LayerNorm", ["intermediate.dense"]),
             (None, ["output.dense"])],
}


class _Stats:
    def __init__(self, n):
        self.sum_abs, self.sum_sq, self.count = torch.zeros(n), torch.zeros(n), 0
        self.hessian = torch.zeros(n, n)

    def add(self, x):
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum_abs += x.abs().sum(0)
        self.sum_sq += x.square().sum(0)
        self.hessian += x.T @ x
        self.count += x.shape[0]


def _setup(kind, kv_heads=2, tokens=24):
    model, blocks = _model(kind, kv_heads)
    model.eval()
    block = model.get_submodule(blocks)[0]
    prefix = f"{blocks}.0."
    # perturb the norms away from their init so a wrong parameterisation shows
    with torch.no_grad():
        for n, p in block.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape) * 0.2)
    seen = {}
    h = block.register_forward_pre_hook(lambda m, a, k: seen.setdefault("call", (a, k)), with_kwargs=True)
    ids = torch.randint(0, 64, (1, tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids, **({} if kind == "bert" else {"use_cache": False}))
    h.remove()
    args, kwargs = seen["call"]

    def call(module, conv):
        out = module(*conv(args), **conv(kwargs))
        return out[0] if isinstance(out, tuple) else out

    linears = {prefix + p + ".weight": m for p, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    params = {p: prefix + p for p, _ in block.named_parameters()}
    hidden = args[0] if args else kwargs["hidden_states"]
    view = block_awq.BlockView(block, linears, params, call, hidden)
    groups = [SimpleNamespace(feeder=f, members=[prefix + m + ".weight" for m in ms]) for f, ms in GROUPS[kind]]
    return view, groups, call, prefix


def test_llama_gqa_folds_norms_and_up_into_down_and_skips_v_to_o():
    view, groups, _, prefix = _setup("llama", kv_heads=2)
    found, skipped = block_awq.candidates(view, groups)
    assert [(m.feeder, m.kind, m.offset) for m in found] == [
        ("input_layernorm", "norm", 0.0), ("post_attention_layernorm", "norm", 0.0), ("mlp.up_proj", "linear", 0.0)]
    assert [s["members"] for s in skipped] == [[prefix + "self_attn.o_proj"]]
    assert "32 channels" in skipped[0]["reason"] and "reads 64" in skipped[0]["reason"]


def test_llama_mha_folds_v_into_o():
    view, groups, _, _ = _setup("llama", kv_heads=4)
    found, skipped = block_awq.candidates(view, groups)
    assert ("self_attn.v_proj", "linear") in [(m.feeder, m.kind) for m in found] and not skipped


def test_gemma_norms_are_one_plus_w():
    view, groups, _, _ = _setup("gemma2", kv_heads=4)
    found, skipped = block_awq.candidates(view, groups)
    offsets = {m.feeder: m.offset for m in found}
    assert offsets == {"input_layernorm": 1.0, "self_attn.v_proj": 0.0, "pre_feedforward_layernorm": 1.0,
                       "mlp.up_proj": 0.0}
    assert not skipped


def test_bert_post_ln_folds_only_value_into_attention_output():
    view, groups, _, prefix = _setup("bert")
    found, skipped = block_awq.candidates(view, groups)
    assert [(m.feeder, m.members) for m in found] == [("attention.self.value", (prefix + "attention.output.dense.weight",))]
    reasons = {tuple(s["members"]): s["reason"] for s in skipped}
    assert "no foldable predecessor" in reasons[tuple(prefix + f"attention.self.{p}" for p in ("query", "key", "value"))]
    assert "changes the block's output" in reasons[(prefix + "intermediate.dense",)]
    assert "no foldable predecessor" in reasons[(prefix + "output.dense",)]


@pytest.mark.parametrize("kind,kv", [("llama", 2), ("gemma2", 4), ("bert", 4)])
def test_scaled_block_keeps_its_output(kind, kv):
    view, groups, call, prefix = _setup(kind, kv)
    stats = {}
    hooks = []
    for g in groups:
        st = _Stats(view.linears[g.members[0]].in_features)
        for n in g.members:
            stats[n] = st
        hooks.append(view.linears[g.members[0]].register_forward_hook(lambda m, a, o, st=st: st.add(a[0])))
    with torch.no_grad():
        want = call(view.module, lambda x: x)
    for h in hooks:
        h.remove()
    values = {prefix + p: t.detach().clone() for p, t in view.module.named_parameters()}
    quantize = mse_quantizer(QuantSpec(bits=4, group_size=16))
    out = block_awq.scale_block(view, groups, stats, values, lambda name: quantize, n_grid=5)
    assert out.mappings and all(m["error"] <= m["error_unscaled"] for m in out.mappings)
    assert set(out.folded) == set(out.values)
    with torch.no_grad():
        for name, value in out.values.items():
            view.module.get_parameter(name[len(prefix):]).copy_(value)
        got = call(view.module, lambda x: x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    changed = [n for n, f in out.folded.items() if f["by"] == "1/s"]
    assert changed and all(out.folded[n]["relative_change"] > 0 for n in changed)


def test_searches_run_first_unless_a_fold_changes_a_later_member():
    """Llama's mappings in forward order never fold into a later mapping's member, so every search can run before
    any fold (side by side on their owners under torchrun); backwards, up → down's fold would change up_proj."""
    view, groups, _, _ = _setup("llama", kv_heads=4)
    found, _ = block_awq.candidates(view, groups)
    assert len(found) == 4 and block_awq._ahead(view, found)
    assert not block_awq._ahead(view, found[::-1])
