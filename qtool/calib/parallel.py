"""What a torchrun run adds to the layer walk (qtool.distributed): each process walks the same blocks on its share
of the calibration windows; before a block's weights are quantized, each statistics record (Σx², Σ|x|, max|x|,
token count, XᵀX) is combined onto one owner process; owners quantize their weights and every process receives the
results, so all of them compute their windows' inputs to the next block with the same quantized block.

Owners: records with a Hessian are spread over the processes by its size (distributed.owners: the largest first,
each to the least loaded process), records without one (plain statistics for `calibrate`) all go to rank 0, which
writes the file. One process: nothing moves and every record is its own.
"""
from __future__ import annotations

import torch

from .. import distributed


def share(group, ids: list) -> list:
    """This process's windows: a fixed, contiguous slice by index (the same for the same number of processes)."""
    return [ids[i] for i in group.share(len(ids))]


def combine(group, stats: list) -> dict[int, int]:
    """Sum every InputStats in `stats` (max for max|x|) onto its owner, in place there; {id(record): owner rank}.
    Every process passes the same records in the same order (the walk builds them from the same block)."""
    if all(st.hessian is not None for st in stats):
        owners = distributed.owners([float(st.hessian.shape[0]) ** 2 for st in stats], group.world)
    else:
        owners = [0] * len(stats)
    for st, owner in zip(stats, owners):
        group.reduce(st.sum_sq, owner)
        group.reduce(st.sum_abs, owner)   # activation-aware scaling's mean|x|
        group.reduce(st.absmax, owner, op="max")
        if st.hessian is not None:
            group.reduce(st.hessian, owner)
        count = torch.tensor([st.count], dtype=torch.int64, device=st.sum_sq.device)
        group.reduce(count, owner)
        if group.rank == owner:
            st.count = int(count)
    return {id(st): owner for st, owner in zip(stats, owners)}


def combine_energy(group, energy: dict, owners: dict) -> None:
    """Each linear's output energy (LinearTaps.energy) summed onto the owner of its statistics, in name order."""
    if group.parallel:
        for name in sorted(energy):
            group.reduce(energy[name], owners[name])


def combine_counts(group, counts: list[torch.Tensor]) -> None:
    """Routed token counts per expert summed on every process (each needs them for the same fallback decision)."""
    for c in counts:
        group.all_sum(c)
