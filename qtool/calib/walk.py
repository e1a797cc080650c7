"""Walk a model one block at a time: what runs before the first block once, then each block loaded, run on every
sample, freed; the final norm and head on demand.

What each block receives besides the hidden states (attention mask, rotary cos/sin, position ids, the cache
switched off) is recorded from the model's own forward: every block is replaced by a recorder that notes its
arguments and passes the hidden states through, so block i's record holds exactly what the full model gives block i
(sliding-window and global layers get their own masks and rotary tables). The hidden states entering block 0 are
the real embedding output. Samples run one at a time (batch 1, no padding).

Stages for the jobs built on it: `blocks()` yields each block loaded; `run` pushes every sample through one;
`collect` gathers its linears' input statistics (dense hooks and per-expert MoE taps, with the all-tokens fallback);
`update` loads quantized weights into it; `tail()` loads what follows the blocks (final norm, head) and runs the
model's own forward from given final hidden states, so logits come out as the model computes them.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import distributed
from ..arch import is_conv1d_module
from ..errors import QtoolError
from ..report.schema import ExpertSource
from ..runtime import release_host_memory
from . import parallel
from .collect import InputGroup, LinearTaps
from .layout import Entry
from .model import Architecture, build_architecture, free_module, linear_modules, unsupported
from .moe import ExpertRef, ExpertTaps, MoeCalib, interface_gap, is_fused_experts


class _Caught(Exception):
    pass


class _Stand(nn.Module):
    """Stands in for a block: `record` notes its arguments, passes the hidden states on (the last one stops the
    forward); `replay` returns given hidden states. Attribute reads go to the real block (e.g. attention_type)."""

    def __init__(self, block: nn.Module, index: int, action):
        super().__init__()
        self.block = block
        self._index, self._action = index, action

    def forward(self, *args, **kwargs):
        return self._action(self._index, args, kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


def _split(args: tuple, kwargs: dict):
    """(hidden states, other positional args, other kwargs, passed by name?) of a block call."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs), False
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs, True


@dataclass
class Sample:
    ids: torch.Tensor            # the token ids (CPU): 1-D, or [B, L] for a batch of windows
    hidden: torch.Tensor         # the current block input, in the compute dtype, on the activation device
    calls: list = field(default_factory=list)  # per block: (other positional args, kwargs, hidden by name?)


@dataclass
class Block:
    index: int
    path: str                    # model path of the block, e.g. 'model.layers.3'
    module: nn.Module
    entries: list[Entry]         # the conversions that fill it

    @property
    def tensors(self) -> list[str]:
        """The checkpoint tensors that fill this block."""
        return [n for e in self.entries for n in e.names]


@dataclass
class Collected:
    stats: dict                  # checkpoint weight name → InputStats (shared objects where inputs are shared)
    experts: dict[str, ExpertSource]  # expert weight name → its index, routed tokens and statistics source
    groups: list[InputGroup]     # dense linears reading one tensor, and the module that produced it
    owners: dict = field(default_factory=dict)  # id(InputStats) → the process that holds its sums (torchrun)
    energy: dict = field(default_factory=dict)  # dense linear's name → ‖XWᵀ‖² of its outputs (LinearTaps), on its owner


class LayerWalk:
    """Holds the model skeleton and the current block inputs of every sample."""

    def __init__(self, ckpt, samples: list[torch.Tensor], device: torch.device, moe: MoeCalib | None = None,
                 arch: Architecture | None = None, group=distributed.SINGLE):
        """ckpt: a checkpoint, or a dense view of a quantized one (formats.dense.DenseView: its weights dequantized as
        the walk loads them); only its .tensors, .get, .config, .path and .root are read. arch: its
        `build_architecture`, when the caller has built it already. group: a torchrun run's process group (each
        process passes its share of the samples; `reduce` combines what they saw)."""
        self.ckpt = ckpt
        self.device = device
        self.group = group
        self.moe = moe or MoeCalib()
        self.arch = arch or build_architecture(ckpt)
        self.model, self.layout, self.dtype = self.arch.model, self.arch.layout, self.arch.dtype
        self.layers = self.arch.blocks
        self._check_experts()
        self.capture(samples)

    # -- structure -------------------------------------------------------------------------------------------
    def block(self, i: int) -> Block:
        path = f"{self.arch.blocks_path}.{i}"
        return Block(i, path, self.layers[i], self.layout.entries_under(path))

    def _check_experts(self) -> None:
        for name, m in self.layers.named_modules():
            if is_fused_experts(m) and (gap := interface_gap(m)):
                raise unsupported(self.ckpt, self.arch.model_type, gap)

    def _head_path(self) -> str | None:
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        return next((n for n, m in self.model.named_modules() if m is head), None) if head is not None else None

    def capture(self, samples: list[torch.Tensor]) -> None:
        """Run what precedes the blocks on new samples (1-D token ids, or [B, L] batches): they replace the current
        block inputs, and the next `blocks()` walks them. The skeleton is built once per walk."""
        self.tokens = sum(int(s.numel()) for s in samples)
        self.store_device = self._activation_device()
        self.inputs = self._capture(samples)

    def _activation_device(self) -> torch.device:
        """Activations stay on the device unless two copies of them would not fit in half its free memory."""
        if self.device.type != "cuda":
            return self.device
        hidden = int(self.model.config.get_text_config().hidden_size)
        need = 2 * self.tokens * hidden * torch.finfo(self.dtype).bits // 8
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if need < free // 2 else torch.device("cpu")

    def _load(self, entries: list[Entry], overrides: dict | None = None) -> None:
        self.layout.load(entries, self.ckpt.get, self.device, overrides)

    # -- capture ---------------------------------------------------------------------------------------------
    @contextmanager
    def _standing(self, action):
        real = list(self.layers)
        for i, b in enumerate(real):
            self.layers[i] = _Stand(b, i, action)
        try:
            yield
        finally:
            for i, b in enumerate(real):
                self.layers[i] = b

    def _forward(self, ids: torch.Tensor):
        extra = {"use_cache": False} if "use_cache" in inspect.signature(self.model.forward).parameters else {}
        ids = ids if ids.ndim == 2 else ids.unsqueeze(0)
        with torch.no_grad():
            return self.model(input_ids=ids.to(self.device), **extra)

    def _capture(self, samples: list[torch.Tensor]) -> list[Sample]:
        head = self._head_path()
        self._load(self.layout.entries_under(self.arch.blocks_path, inside=False) if head is None else
                   [e for e in self.layout.entries_under(self.arch.blocks_path, inside=False)
                    if not all(t.startswith(head + ".") for t in e.targets)])
        last = len(self.layers) - 1
        out: list[Sample] = []

        def record(i, args, kwargs):
            hidden, rest, kw, by_name = _split(args, kwargs)
            if i == 0:
                out[-1].hidden = hidden.to(self.store_device, self.dtype)
            out[-1].calls.append((rest, kw, by_name))
            if i == last:
                raise _Caught
            return hidden

        try:
            with self._standing(record):
                for ids in samples:
                    ids = ids.cpu() if ids.ndim == 2 else ids.reshape(-1).cpu()
                    out.append(Sample(ids, None))
                    try:
                        self._forward(ids)
                    except _Caught:
                        pass
        finally:
            free_module(self.model)  # what runs before the blocks is not needed any more
        if any(len(s.calls) != len(self.layers) for s in out):
            raise unsupported(self.ckpt, self.arch.model_type, "its forward does not call every block once per sample")
        return out

    # -- the walk --------------------------------------------------------------------------------------------
    def blocks(self):
        """Each block in turn, loaded onto the device, freed when the caller moves on."""
        for i in range(len(self.layers)):
            block = self.block(i)
            self._load(block.entries)
            missing = [n for n, p in block.module.named_parameters() if p.is_meta]
            if missing:
                raise QtoolError(self.ckpt.path, f"no checkpoint tensor fills {block.path}.{missing[0]} "
                                                 f"(and {len(missing) - 1} more)" if len(missing) > 1 else
                                 f"no checkpoint tensor fills {block.path}.{missing[0]}")
            try:
                yield block
            finally:
                free_module(block.module)
                release_host_memory()

    @torch.no_grad()
    def run(self, block: Block, keep: bool, hiddens: list | None = None) -> None:
        """Every sample through `block` (or the given block inputs); with keep, its outputs become the next
        block's inputs."""
        for s, h in zip(self.inputs, hiddens or [s.hidden for s in self.inputs]):
            args, kwargs, by_name = s.calls[block.index]
            h = h.to(self.device)
            out = block.module(*args, hidden_states=h, **kwargs) if by_name else block.module(h, *args, **kwargs)
            if keep:
                out = out[0] if isinstance(out, (tuple, list)) else out
                s.hidden = out.to(self.store_device, self.dtype)

    def targets(self, block: Block) -> dict[str, nn.Module | ExpertRef]:
        """The block's checkpoint weights whose inputs the walk can observe: {name: linear module | ExpertRef}.
        GPT-2's Conv1D modules are included (callers decide whether to calibrate them)."""
        linears = {id(m): m for m in linear_modules(block.module).values()}
        out: dict = {}
        for name in block.tensors:
            entry = self.layout.entry_of[name]
            if len(entry.targets) != 1:
                continue  # split over several model tensors: no single input to observe
            slot = self.layout.slot(name)
            path, _, leaf = slot.target.rpartition(".")
            module = self.model.get_submodule(path)
            if id(module) in linears and leaf == "weight" and slot.index is None:
                out[name] = module
            elif is_fused_experts(module) and slot.index is not None and leaf in ("gate_up_proj", "up_proj", "down_proj"):
                out[name] = ExpertRef(path, slot.index, "hidden" if leaf == "down_proj" else "input")
        return out

    def collect(self, block: Block, names, hessian: bool = False, keep: bool = False) -> Collected:
        """Input statistics of the named weights of `block` over every sample (optionally keeping the outputs)."""
        targets = self.targets(block)
        dense = {n: targets[n] for n in names if isinstance(targets.get(n), nn.Module)}
        experts = {n: targets[n] for n in names if isinstance(targets.get(n), ExpertRef)}
        fused = {r.module: self.model.get_submodule(r.module) for r in experts.values()}
        before = [s.hidden for s in self.inputs] if experts and keep and self.moe.mode == "routed" else None
        mode = self.moe.mode
        with LinearTaps(block.module, dense, self.device, hessian) as lt, \
                ExpertTaps(fused, experts, self.device, hessian, mode) as et:
            self.run(block, keep)
        self.reduce(routed=list(et.routed.values()))
        routed = {n: int(et.routed[r.module][r.index]) for n, r in experts.items()}
        starved = {n: r for n, r in experts.items() if mode == "routed" and routed[n] < self.moe.min_tokens}
        stats = {**lt.stats, **et.stats}
        if starved:
            with ExpertTaps(fused, starved, self.device, hessian, "all") as fb:
                self.run(block, False, hiddens=before)
            stats.update(fb.stats)
        info = {n: ExpertSource(expert=r.index, tokens=routed[n], stats="all" if mode == "all" or n in starved else "routed")
                for n, r in experts.items()}
        owners = self.reduce(stats=list({id(s): s for s in stats.values()}.values()))
        parallel.combine_energy(self.group, lt.energy, {n: owners.get(id(stats.get(n)), 0) for n in lt.energy})
        return Collected(stats, info, lt.groups, owners, lt.energy)

    def reduce(self, stats: list = (), routed: list[torch.Tensor] = ()) -> dict[int, int]:
        """Where a data-parallel run (each process a share of the samples) combines, in place, what its processes
        saw before it is used: the routed token counts per expert (summed on every process) before the fallback
        decision, and each InputStats (sum_sq, hessian and count summed, absmax maxed) onto its owner before any
        weight is quantized (qtool.calib.parallel). Returns {id(record): owner rank}. One process: nothing moves."""
        parallel.combine_counts(self.group, routed)
        return parallel.combine(self.group, stats) if stats else {}

    def update(self, block: Block, weights: dict[str, torch.Tensor]) -> None:
        """Load new values of some checkpoint weights (e.g. dequantized) into the loaded block, through the same
        conversion as the originals (an expert's 2-D weight lands in its slice of the fused parameter)."""
        self._load([e for e in block.entries if any(n in weights for n in e.names)], overrides=weights)

    # -- after the blocks ------------------------------------------------------------------------------------
    @contextmanager
    def tail(self):
        """Load everything outside the blocks (final norm, head, embeddings; tied weights shared as the model ties
        them) and yield a Tail that runs the model's own forward from given final hidden states."""
        self._load(self.layout.entries_under(self.arch.blocks_path, inside=False))
        for target, source in (getattr(self.model, "all_tied_weights_keys", None) or {}).items():
            path, _, leaf = target.rpartition(".")
            module = self.model.get_submodule(path)
            if module._parameters[leaf].is_meta:
                module._parameters[leaf] = self.model.get_parameter(source)
        try:
            yield Tail(self)
        finally:
            free_module(self.model)
            release_host_memory()


class Tail:
    """What follows the blocks, loaded. `logits(i, h)`: the model's output for sample i whose last block gave h
    (final norm, head and any logit post-processing of the model's own forward: Gemma's soft-capping, Granite's
    scaling); `head_input(i, h)`: what enters the output embeddings (`head`), for a caller that applies the head
    itself (in vocabulary chunks); where `head(head_input(...))` differs from `logits(...)` the model post-processes
    its logits."""

    def __init__(self, walk: LayerWalk):
        self._walk = walk
        model = walk.model
        self.head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    def _replay(self, i: int, final_hidden: torch.Tensor):
        walk, last = self._walk, len(self._walk.layers) - 1

        def replay(j, args, kwargs):
            return final_hidden.to(walk.device, walk.dtype) if j == last else _split(args, kwargs)[0]

        with walk._standing(replay):
            return walk._forward(walk.inputs[i].ids)

    def logits(self, i: int, final_hidden: torch.Tensor) -> torch.Tensor:
        out = self._replay(i, final_hidden)
        return out.logits if hasattr(out, "logits") else out[0]

    def head_input(self, i: int, final_hidden: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise QtoolError(self._walk.ckpt.path, f"{type(self._walk.model).__name__} has no output head")
        seen = []

        def stop(mod, args):
            seen.append(args[0])
            raise _Caught

        handle = self.head.register_forward_pre_hook(stop)
        try:
            self._replay(i, final_hidden)
        except _Caught:
            pass
        finally:
            handle.remove()
        return seen[0]


def calibratable(targets: dict) -> dict:
    """The targets whose statistics can calibrate their weight: nn.Linear weights and MoE expert weights (GPT-2's
    Conv1D left out: stored [in, out], quantized without calibration)."""
    return {n: t for n, t in targets.items() if not (isinstance(t, nn.Module) and is_conv1d_module(t))}
