"""Per-expert input statistics of a mixture-of-experts layer as transformers 5 runs it: fused.

transformers 5 keeps an MoE layer's experts as one module holding 3-D parameters (`gate_up_proj` [E, 2I, H] or
`up_proj`, and `down_proj` [E, H, I]; the checkpoint's per-expert 2-D tensors are stacked into them at load) and
runs them through one `experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])` call (grouped or
batched matmuls; `@use_experts_implementation`). No per-expert module exists to hook. So a pre-hook on the experts
module reads the router's actual decision, `top_k_index`, and per expert e takes the rows the router sends it:
x_e = hidden[rows where top_k_index == e] is the input of expert e's gate/up projections, and
act(x_e·W_gate_up[e]ᵀ) (the module's own `_apply_gate`, or `act_fn` without a gate) is the input of its down
projection — exactly what each expert computes on its tokens. The layer's output is left to the model's own code.

`--moe-calib all` takes every token for every expert instead (the input side is then one record shared by all
experts); `routed` (the default) falls back to that for an expert the router sent fewer than `min_tokens` tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .collect import InputStats

# An expert's XᵀX from fewer tokens than this is too thin to steer GPTQ or an importance-weighted search; such an
# expert takes the statistics of all calibration tokens instead (as llm-compressor's all-experts calibration does).
DEFAULT_MIN_TOKENS = 32


@dataclass(frozen=True)
class MoeCalib:
    mode: str = "routed"
    min_tokens: int = DEFAULT_MIN_TOKENS

    @classmethod
    def of(cls, mode: str = "routed", min_tokens: int | None = None) -> "MoeCalib":
        """From the jobs' arguments (`moe_calib`, `moe_min_tokens`: checked by qtool.jobs.arguments), None for the
        default threshold."""
        return cls(mode, DEFAULT_MIN_TOKENS if min_tokens is None else min_tokens)


@dataclass(frozen=True)
class ExpertRef:
    """Where a checkpoint expert weight reads from: the fused experts module, the expert, and which projection side
    ('input': gate/up read the layer input; 'hidden': down reads the activated gate·up product)."""
    module: str
    index: int
    side: str


def is_fused_experts(module: nn.Module) -> bool:
    down = getattr(module, "down_proj", None)
    return isinstance(down, nn.Parameter) and down.ndim == 3


def interface_gap(module: nn.Module) -> str | None:
    """What a fused experts module lacks of transformers' standard experts interface, or None."""
    missing = [a for a in ("num_experts", "has_gate", "has_bias", "is_transposed", "act_fn") if not hasattr(module, a)]
    if missing:
        return f"its experts module {type(module).__name__} lacks transformers' experts interface ({', '.join(missing)})"
    return None


def expert_hidden(m: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e's down-projection input for its tokens x, as the model's experts forward computes it."""
    w = m.gate_up_proj[e] if m.has_gate else m.up_proj[e]
    y = x @ w if m.is_transposed else F.linear(x, w)
    if m.has_bias:
        y = y + (m.gate_up_proj_bias if m.has_gate else m.up_proj_bias)[e]
    return m._apply_gate(y) if m.has_gate else m.act_fn(y)


class ExpertTaps:
    """Pre-hooks on fused experts modules for the duration of a `with` block.

    refs: {checkpoint weight name: ExpertRef}. After the block, `stats[name]` holds that weight's input statistics
    (one object per expert and side, and with mode 'all' one object for every expert's input side), and
    `routed[module]` the number of tokens the router sent each expert (in every mode).
    """

    def __init__(self, modules: dict[str, nn.Module], refs: dict[str, ExpertRef], device, hessian: bool, mode: str):
        self.modules, self.mode = modules, mode
        self.routed = {p: torch.zeros(m.num_experts, dtype=torch.int64, device=device) for p, m in modules.items()}
        self.stats: dict[str, InputStats] = {}
        self._wanted: dict[str, dict[tuple[int, str], InputStats]] = {p: {} for p in modules}
        for name, ref in refs.items():
            m = modules[ref.module]
            key = (-1 if mode == "all" and ref.side == "input" else ref.index, ref.side)
            if key not in self._wanted[ref.module]:
                width = m.down_proj.shape[1 if m.is_transposed else 2] if ref.side == "hidden" else _hidden_size(m)
                self._wanted[ref.module][key] = InputStats(width, device, hessian)
            self.stats[name] = self._wanted[ref.module][key]
        self._handles = []

    def _hook(self, path: str):
        def pre(module, args, kwargs):
            hidden, index = _routing(args, kwargs)
            hidden = hidden.reshape(-1, hidden.shape[-1])
            index = index.reshape(hidden.shape[0], -1)
            self.routed[path] += torch.bincount(index.flatten(), minlength=module.num_experts)[:module.num_experts]
            with torch.no_grad():
                for (e, side), st in self._wanted[path].items():
                    if e == -1:
                        st.add(hidden)
                        continue
                    x = hidden if self.mode == "all" else hidden[(index == e).any(-1)]
                    if x.shape[0]:
                        st.add(x if side == "input" else expert_hidden(module, e, x))
        return pre

    def __enter__(self):
        self._handles = [m.register_forward_pre_hook(self._hook(p), with_kwargs=True) for p, m in self.modules.items()]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _hidden_size(m: nn.Module) -> int:
    w = m.gate_up_proj if m.has_gate else m.up_proj
    return w.shape[1] if m.is_transposed else w.shape[2]


def _routing(args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_states, top_k_index) of an experts call: positional in transformers' interface, or by name."""
    names = ("hidden_states", "top_k_index")
    values = list(args[:2]) + [kwargs[n] for n in names[len(args[:2]):]]
    return values[0], values[1]
