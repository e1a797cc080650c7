"""Work-arounds that let llm-compressor 0.14.0.1 run on a machine without an accelerator (bench only).

AWQModifier pins its cached block inputs (`IntermediatesCache.pin_memory`) before every mapping's grid search so
that host→device copies can be asynchronous; `Tensor.pin_memory()` raises "Cannot access accelerator device when
none is available" on a CPU-only torch, so AWQ fails on its first smoothing step. Pinning changes no value, only
transfer speed: without an accelerator it is skipped. GPTQ and RTN never pin.
"""
from __future__ import annotations


def apply() -> None:
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available() or getattr(IntermediatesCache, "_qtool_bench_patched", False):
        return
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    IntermediatesCache._qtool_bench_patched = True
