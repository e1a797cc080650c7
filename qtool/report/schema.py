"""The report every job returns (design §7, README "Reports"), typed: one TypedDict per part, and `kind` naming the
job that made it (render dispatches on it). The JSON field names and values are the documented schema; `assemble`
puts the parts in its order. Each part has one builder: size (report.size), errors, summary and gate
(report.errors), LoRA and training memory (report.lora), timing (here), the eval report (report.evaluation).
"""
from __future__ import annotations

import time
from typing import Literal, TypedDict

from .. import __version__

Kind = Literal["inspect", "quantize", "dequantize", "merge", "eval"]


class ErrorStats(TypedDict):
    rel_error: float
    sqnr_db: float
    max_abs: float
    mse: float
    cosine: float


class ExpertSource(TypedDict):
    """Where a mixture-of-experts expert weight's calibration statistics came from."""
    expert: int                       # its index in the MoE layer
    tokens: int                       # calibration tokens the router sent it
    stats: Literal["routed", "all"]   # its routed tokens, or every token (--moe-calib all, or under --moe-min-tokens)


class ExpertRow(ExpertSource):
    """`qtool calibrate`'s summary: one per expert weight (module = the weight's module)."""
    module: str


class _LayerBase(TypedDict):
    name: str
    shape: list[int]
    dtype: str
    bytes: int
    quantized: bool
    reason: str | None
    error: ErrorStats | None


class Layer(_LayerBase, total=False):
    # merge-lora
    merged: bool
    delta_rel_norm: float | None
    # calibrated quantize: qtool.quant.QuantizedWeight.info and the output error on the calibration data
    method: str
    weighted: bool
    damp: float
    act_order: bool
    calibrated: bool
    output_error_before: float | None
    output_error_after: float | None
    note: str
    awq: AwqFolded               # a quantized weight whose columns activation-aware scaling scaled
    folded: AwqFolded            # a dense tensor 1/s was folded into
    expert: ExpertSource  # an MoE expert weight (from the walk, or from the statistics file it was quantized with)
    # mixed precision (--scheme rules, --target-bits/--max-size): the module's SPEC, and when a budget chose it,
    # its predicted error (the weight error the allocation minimised)
    scheme: str
    predicted_error: float


class DtypeRow(TypedDict):
    tensors: int
    parameters: int
    bytes: int


Estimates = TypedDict("Estimates", {"float32": int, "float16": int, "int8": int, "int4": int})


class SchemeShare(TypedDict):
    modules: int
    parameters: int
    bytes: int
    share: float                # of the quantized weights' parameters


class Quantization(TypedDict, total=False):
    bits: int | None            # None when config groups differ
    symmetric: bool | None
    group_size: int | None
    method: str | None
    format: str
    ignored: list[str]
    provider: str | None
    quantized_tensors: int
    bits_per_weight: float | None
    vllm_servable: bool
    schemes: dict[str, SchemeShare]   # by SPEC (int4:g128, int8:channel, ...), when config groups differ


class Lora(TypedDict, total=False):
    rank: int | list[int]
    alpha: float | list[float]
    scaling: float | dict[str, float] | list | None   # one value, or per module where patterns make them differ
    targets: list[str]
    parameters: int
    base_parameters: int | None
    fraction_of_base: float | None
    use_rslora: bool
    use_dora: bool
    rank_pattern: dict
    alpha_pattern: dict
    target_modules: object
    ranks_used: list[int]
    weights: list[float]
    merged_tensors: list[str]
    adapters: list[dict]


class Summary(TypedDict):
    rel_error_mean: float
    rel_error_max: float
    sqnr_db_min: float | None
    worst: list[str]


class Gate(TypedDict):
    max_rel_error: float
    passed: bool
    failed: list[str]


class Timing(TypedDict):
    seconds: float
    input_gb_per_s: float | None
    processes: int  # the torchrun run's world size (1 without torchrun)


class LoraTraining(TypedDict):
    rank: int
    targets: int
    adapter_parameters: int
    adapter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    base_bytes: int
    tokens: int                            # inspect --lora-tokens: the tokens of one training step
    activation_bytes_per_token: int | None  # None when config.json lacks the sizes
    activation_bytes: int
    total_bytes: int


class Size(TypedDict):
    """What a checkpoint holds and costs (report.size.size_part)."""
    format: str
    tensors: int
    parameters: int
    bytes: int
    bits_per_parameter: float | None
    dtypes: dict[str, DtypeRow]
    estimates: Estimates
    quantization: Quantization | None
    layers: list[Layer]


class _ReportBase(Size):
    qtool_version: str
    kind: Kind
    source: str
    lora: Lora | None
    summary: Summary | None
    gate: Gate | None
    timing: Timing | None


class Kld(TypedDict):
    """Statistics of the per-position KL(P_ref ‖ P_model) in nats (quantiles: numpy's linear interpolation)."""
    mean: float
    median: float
    p90: float
    p99: float
    max: float


class EvalBlock(TypedDict):
    index: int
    hidden_rel_error: float | None   # ‖h_model − h_ref‖ / ‖h_ref‖ of the block's output over the real tokens


class EvalGate(TypedDict):
    passed: bool
    failed: list[str]                # metrics: "kld", "ppl_ratio", "top1_agreement"
    max_kld: float | None
    max_ppl_ratio: float | None
    min_top1: float | None


class EvalTiming(TypedDict):
    seconds: float
    tokens_per_s: float | None
    processes: int  # the torchrun run's world size (1 without torchrun): each walked its share of the windows


class EvalReport(TypedDict):
    """`qtool eval` (and the `eval` block of quantize/merge-lora/dequantize --eval). Without a reference, ref_ppl,
    ppl_ratio, kld, top1_agreement and blocks are null."""
    qtool_version: str
    kind: Literal["eval"]
    model: str
    ref: str | None
    data: str
    seq_len: int
    windows: int
    tokens: int
    predicted: int                   # tokens − windows: each window's first token is never predicted
    ppl: float | None                # exp(Σ NLL / predicted) over all windows; null beyond float64's range
    ref_ppl: float | None
    ppl_ratio: float | None
    kld: Kld | None
    top1_agreement: float | None
    blocks: list[EvalBlock] | None
    gate: EvalGate | None
    device: str
    timing: EvalTiming


class Solver(TypedDict):
    groups: int                 # fused groups chosen for (modules vLLM runs as one layer share one)
    states: int                 # partial solutions the exact search kept
    lower_bound: float          # the Lagrangian bound on the predicted error (<= predicted_error)


class AllocationPart(TypedDict):
    """quantize --target-bits/--max-size: what the budget was and what the exact allocation reached."""
    target: float | int         # bits per weight, or bytes
    target_kind: Literal["bits_per_weight", "bytes"]
    achieved_bits: float        # 8·(codes + scales + zero points)/parameters over the candidate weights
    achieved_bytes: int         # every file of OUT
    predicted_error: float      # Σ over candidate modules of their predicted error
    by_spec: dict[str, list[str]]
    candidates: list[str]
    solver: Solver


class AwqMapping(TypedDict):
    block: str                  # the block's model path
    feeder: str                 # the norm or previous linear 1/s is folded into (a path inside the block)
    kind: str                   # "norm" | "linear"
    offset: float               # a norm's g(w) = w + offset (1 for Gemma's 1 + w)
    members: list[str]          # the linear modules reading its output, whose columns are scaled by s
    alpha: float                # the chosen exponent of s = mean|x|^α
    error_ratio: float          # mapped outputs' squared error, chosen s ÷ no scaling (≤ 1)
    error_unscaled: float
    error: float


class AwqSkipped(TypedDict):
    block: str
    members: list[str]
    reason: str


class AwqFolded(TypedDict):
    tensor: str
    relative_change: float      # ‖new − old‖ / ‖old‖ of the tensor before quantization
    by: str                     # "1/s" (folded into) or "s" (columns scaled)
    mapping: str
    alpha: float


class Awq(TypedDict):
    """What activation-aware scaling did (quantize --method awq | awq+gptq)."""
    grid: int
    mappings: list[AwqMapping]
    skipped: list[AwqSkipped]
    folded: list[AwqFolded]


class Report(_ReportBase, total=False):
    output: str                  # quantize, dequantize
    largest: list[str]           # inspect: the --top largest tensors
    lora_training: LoraTraining  # inspect --lora-rank
    copied_files: list[str]      # merge-lora
    allocation: AllocationPart   # quantize with --target-bits or --max-size
    eval: EvalReport             # quantize, merge-lora, dequantize --eval: OUT evaluated against the input
    awq: Awq                     # quantize --method awq | awq+gptq


def timing_part(start: float, input_bytes: int, processes: int = 1) -> Timing:
    """Seconds since `start` (time.perf_counter), the input read per second, to the millisecond, and how many
    processes did the work (a torchrun run's world size)."""
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3),
            "input_gb_per_s": round(input_bytes / 1e9 / seconds, 3) if seconds > 0 else None, "processes": processes}


def assemble(kind: Kind, source, size: Size, *, layers: list[Layer] | None = None, lora: Lora | None = None,
             summary: Summary | None = None, gate: Gate | None = None, timing: Timing | None = None,
             **extra) -> Report:
    """A report of `kind` in the schema's field order; `layers` replaces the size part's rows (with errors, merge
    facts, calibration facts), `extra` holds the job's own fields (output, largest, lora_training, copied_files)."""
    head = {"qtool_version": __version__, "kind": kind, "source": str(source)}
    body = {k: size[k] for k in ("format", "tensors", "parameters", "bytes", "bits_per_parameter", "dtypes",
                                 "estimates", "quantization")}
    parts = {"lora": lora, "layers": size["layers"] if layers is None else layers, "summary": summary,
             "gate": gate, "timing": timing}
    return {**head, **body, **parts, **extra}
