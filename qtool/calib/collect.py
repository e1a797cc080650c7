"""Forward hooks that accumulate per-input-channel statistics of linear layers, on the device, in float32."""
from __future__ import annotations

import torch
from torch import nn

from ..arch import linear_features


class InputStats:
    """Σx², max|x|, token count and optionally XᵀX of everything a module receives."""

    def __init__(self, in_features: int, device: torch.device, hessian: bool):
        self.sum_sq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.absmax = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.count = 0  # tokens, known on the host from shapes: no device sync
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum_sq += x.square().sum(0)
        torch.maximum(self.absmax, x.abs().amax(0), out=self.absmax)
        self.count += x.shape[0]
        if self.hessian is not None:
            self.hessian.addmm_(x.T, x)

    def as_dict(self) -> dict:
        return {"sum_sq": self.sum_sq, "absmax": self.absmax, "count": self.count}

    def importance(self) -> torch.Tensor:
        return self.sum_sq / max(self.count, 1)


class Hooks:
    """Attach InputStats to modules for the duration of a `with` block."""

    def __init__(self, modules: dict[str, nn.Module], device: torch.device, hessian_for=()):
        self.stats = {name: InputStats(linear_features(m)[1], device, name in hessian_for) for name, m in modules.items()}
        self._modules = modules
        self._handles = []

    def __enter__(self):
        for name, m in self._modules.items():
            st = self.stats[name]
            self._handles.append(m.register_forward_hook(lambda mod, args, out, st=st: st.add(args[0].detach())))
        return self.stats

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
