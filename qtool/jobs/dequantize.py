"""`qtool dequantize`: a pack-quantized checkpoint (qtool's or compressed-tensors') back to a dense one that
transformers loads with no extra package.

open → plan every logical tensor at its dense dtype → write each (a packed module dequantized) → report."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .. import runtime
from ..checkpoint import CheckpointWriter, TensorInfo, open_checkpoint
from ..checkpoint.outputs import FOLDER, REPORT, guarded
from ..errors import QtoolError
from ..formats import compressed_tensors as ct
from ..formats.dense import DenseView, dense_dtype, with_dtype
from ..progress import NullProgress
from ..report.render import write_json
from ..report.schema import Report, assemble, timing_part
from ..report.size import Listing, checkpoint_format, size_part
from .common import copy_side_files
from .arguments import checked


@checked
@guarded(inputs=("source",), outputs={"out": FOLDER, "report_path": REPORT})
def dequantize(source, out, dtype: str | torch.dtype | None = None, *, overwrite=False, revision=None,
               max_shard_bytes=None, report_path=None, progress=None) -> Report:
    start = time.perf_counter()
    progress = progress or NullProgress()
    dtype = dense_dtype(dtype)
    ckpt = open_checkpoint(source, revision)
    view = DenseView(ckpt)
    if view.scheme is None:
        method = ct.quant_method(ckpt.config)
        why = f"quantization_config's quant_method is {method!r}" if method else "no quantization_config in config.json"
        raise QtoolError(source, f"is not a compressed-tensors quantized checkpoint ({why})")
    outputs = [(n, view.shape(n), _out_dtype(view.dtype(n), dtype)) for n in view.names]
    config = with_dtype({k: v for k, v in (ckpt.config or {}).items() if k != "quantization_config"}, dtype)
    with runtime.session("cpu", parallel=False), CheckpointWriter(out, overwrite=overwrite) as writer:
        shards = writer.plan(outputs, max_shard_bytes=max_shard_bytes)
        progress.start("dequantizing", total=len(outputs))
        for name, _, out_dtype in outputs:
            writer.write(name, view.get(name, dtype=out_dtype))
            progress.advance(1, description=name)
        if config:
            writer.write_json("config.json", config)
        copied = copy_side_files(ckpt, writer, {"config.json": None})
    written = Listing({n: TensorInfo(n, tuple(s), d, Path(out), math.prod(s) * d.itemsize) for n, s, d in outputs},
                      config or None, checkpoint_format("safetensors", len(shards), None))
    report = assemble("dequantize", source, size_part(written),
                      timing=timing_part(start, sum(i.nbytes for i in ckpt.tensors.values())), output=str(out),
                      copied_files=copied)
    if report_path is not None:
        write_json(report, report_path)
    return report


def _out_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and stored.is_floating_point else stored
