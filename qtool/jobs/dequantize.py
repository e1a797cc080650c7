"""`qtool dequantize`: a pack-quantized checkpoint (qtool's or compressed-tensors') back to a dense one that
transformers loads with no extra package."""
from __future__ import annotations

import time

import torch

from ..checkpoint import CheckpointWriter, open_checkpoint
from ..checkpoint.outputs import FOLDER, REPORT, guarded
from ..errors import QtoolError
from ..formats import compressed_tensors as ct
from ..formats.dense import DenseView, dense_dtype
from ..progress import NullProgress
from ..report.render import write_json
from ..report.size import size_report
from .common import copy_side_files, timing
from .arguments import checked


@checked
@guarded(inputs=("source",), outputs={"out": FOLDER, "report_path": REPORT})
def dequantize(source, out, dtype: str | torch.dtype | None = None, *, overwrite=False, revision=None,
               max_shard_bytes=None, report_path=None, progress=None) -> dict:
    start = time.perf_counter()
    progress = progress or NullProgress()
    dtype = dense_dtype(dtype)
    ckpt = open_checkpoint(source, revision)
    view = DenseView(ckpt)
    if view.scheme is None:
        method = ct.quant_method(ckpt.config)
        why = f"quantization_config's quant_method is {method!r}" if method else "no quantization_config in config.json"
        raise QtoolError(source, f"is not a compressed-tensors quantized checkpoint ({why})")

    def out_dtype(name):
        d = view.dtype(name)
        return dtype if dtype is not None and d.is_floating_point else d

    with CheckpointWriter(out, overwrite=overwrite) as writer:
        writer.plan([(n, view.shape(n), out_dtype(n)) for n in view.names], max_shard_bytes=max_shard_bytes)
        progress.start("dequantizing", total=len(view.names))
        for name in view.names:
            writer.write(name, view.get(name, dtype=out_dtype(name)))
            progress.advance(1, description=name)
        config = {k: v for k, v in (ckpt.config or {}).items() if k != "quantization_config"}
        if dtype is not None and "torch_dtype" in config:
            config["torch_dtype"] = str(dtype).removeprefix("torch.")
        if dtype is not None and "dtype" in config:
            config["dtype"] = str(dtype).removeprefix("torch.")
        if config:
            writer.write_json("config.json", config)
        copied = copy_side_files(ckpt, writer)
    report = size_report(open_checkpoint(out), source=str(source))
    report["timing"] = timing(start, sum(i.nbytes for i in ckpt.tensors.values()))
    report["output"] = str(out)
    report["copied_files"] = copied
    if report_path is not None:
        write_json(report, report_path)
    return report
