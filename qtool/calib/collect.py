"""Per-input-channel statistics of what a block's linear layers receive, on the device, in float32.

Linears that read the very same tensor (q/k/v after the attention norm, gate/up after the MLP norm) share one
record: it is found on the first sample by tensor identity, so their Σx² and XᵀX are computed once. The module that
produced that tensor (the norm feeding q/k/v) is noted with the group: activation-aware scaling folds into it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch import linear_features

GRAM_BLOCK = 256  # columns per product of XᵀX's lower block triangle: about half a full product's flops


def add_lower_gram(h: torch.Tensor, x: torch.Tensor) -> None:
    """h += XᵀX on the diagonal blocks and below only (column blocks of GRAM_BLOCK): XᵀX is symmetric, so the blocks
    above the diagonal are left for `mirror_lower` to copy once, when the sum is read."""
    for j in range(0, h.shape[0], GRAM_BLOCK):
        h[j:, j:j + GRAM_BLOCK].addmm_(x[:, j:].T, x[:, j:j + GRAM_BLOCK])


def mirror_lower(h: torch.Tensor) -> None:
    """The blocks above the diagonal of `add_lower_gram`'s sum, from their transposes below it (in place)."""
    for j in range(0, h.shape[0] - GRAM_BLOCK, GRAM_BLOCK):
        h[j:j + GRAM_BLOCK, j + GRAM_BLOCK:] = h[j + GRAM_BLOCK:, j:j + GRAM_BLOCK].T


class InputStats:
    """Σx², Σ|x| (activation-aware scaling's mean|x|), max|x|, token count and optionally XᵀX of everything a module
    receives."""

    def __init__(self, in_features: int, device: torch.device, hessian: bool):
        self.sum_sq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.sum_abs = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.absmax = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.count = 0  # tokens, known on the host from shapes: no device sync
        self._gram = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None
        self._mirrored = True

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum_sq += x.square().sum(0)
        a = x.abs()
        self.sum_abs += a.sum(0)
        torch.maximum(self.absmax, a.amax(0), out=self.absmax)
        self.count += x.shape[0]
        if self._gram is not None:
            add_lower_gram(self._gram, x)
            self._mirrored = False

    @property
    def hessian(self) -> torch.Tensor | None:
        """XᵀX of every input so far (None when not collected), made whole on first read after additions."""
        if not self._mirrored:
            mirror_lower(self._gram)
            self._mirrored = True
        return self._gram

    def tensors(self) -> list[torch.Tensor]:
        """What a data-parallel run sums (sum_sq, sum_abs, hessian) or maxes (absmax) across ranks before using it."""
        return [t for t in (self.sum_sq, self.sum_abs, self.absmax, self.hessian) if t is not None]

    def as_dict(self) -> dict:
        return {"sum_sq": self.sum_sq, "absmax": self.absmax, "count": self.count}

    def importance(self) -> torch.Tensor:
        return self.sum_sq / max(self.count, 1)


@dataclass
class InputGroup:
    """Linears (checkpoint weight names) that read one tensor, and the block module whose output it is, if any."""
    feeder: str | None
    members: list[str] = field(default_factory=list)


class LinearTaps:
    """Forward hooks on some of a block's linear modules for the duration of a `with` block.

    modules: {checkpoint weight name: module}. `stats[name]` is the InputStats of that weight's input (one object
    for names whose modules read the same tensor); `groups` says which share it and which module produced it;
    `energy[name]` (nn.Linear only) is ‖XWᵀ‖² of its outputs less the bias, float64 on the device: tr(W H Wᵀ), the
    denominator of its output errors, which the forward has already computed.
    """

    def __init__(self, block: nn.Module, modules: dict[str, nn.Module], device: torch.device, hessian: bool = False):
        self.block, self.device, self.hessian = block, device, hessian
        self._modules = modules
        self.stats: dict[str, InputStats] = {}
        self.groups: list[InputGroup] = []
        self.owner: dict[str, str] = {}        # name → the name whose record it shares
        self.energy: dict[str, torch.Tensor] = {}
        self._seen: dict[int, tuple] = {}      # first sample: id(input) → (input, its group)
        self._produced: dict[int, tuple] = {}  # first sample: id(output) → (output, module name)
        self._handles, self._first_only = [], []

    def _energy(self, name: str, module: nn.Module, y: torch.Tensor) -> None:
        if name not in self.energy:
            return
        y = y.detach().reshape(-1, y.shape[-1]).float()
        if module.bias is not None:
            y = y - module.bias.detach().float()
        self.energy[name] += y.square().sum(dtype=torch.float64)

    def _record(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        if name not in self.owner:  # first call: find who else reads this tensor (known on the first sample)
            hit = self._seen.get(id(x))
            if hit is not None and hit[0] is x:  # the very tensor another linear read: share its record
                hit[1].members.append(name)
                self.owner[name] = hit[1].members[0]
                self.stats[name] = self.stats[self.owner[name]]
                return
            made = self._produced.get(id(x))
            group = InputGroup(made[1] if made is not None and made[0] is x else None, [name])
            self.groups.append(group)
            self._seen[id(x)] = (x, group)
            self.owner[name] = name
            self.stats[name] = InputStats(linear_features(module)[1], self.device, self.hessian)
        if self.owner[name] == name:
            self.stats[name].add(x.detach())

    def _tap(self, name: str):
        def hook(mod, args, out):  # returns None: the module's output is left as it is
            self._record(name, mod, args[0])
            self._energy(name, mod, out)
        return hook

    def _produce(self, name):
        def hook(mod, args, out):
            if torch.is_tensor(out):
                self._produced[id(out)] = (out, name)
        return hook

    def _end_of_first_sample(self, *_):
        for h in self._first_only:
            h.remove()
        self._first_only.clear()
        self._seen.clear()
        self._produced.clear()

    def __enter__(self):
        # every linear's sum exists from the start: the same names on every process of a torchrun run
        self.energy = {n: torch.zeros((), dtype=torch.float64, device=self.device)
                       for n, m in self._modules.items() if isinstance(m, nn.Linear)}
        self._first_only = [m.register_forward_hook(self._produce(name)) for name, m in self.block.named_modules() if name]
        self._first_only.append(self.block.register_forward_hook(self._end_of_first_sample))
        for name, m in self._modules.items():
            self._handles.append(m.register_forward_hook(self._tap(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles + self._first_only:
            h.remove()
        self._handles.clear()
        self._first_only.clear()
