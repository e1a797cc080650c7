"""Decide, for every tensor of a checkpoint, whether it is quantized and why.

The default follows the contract: 2-D floating weights of linear layers are quantized; embeddings, output
heads, norms, biases and other 1-D tensors stay as they are unless `--include` asks. `--exclude` wins over
`--include`. Globs match the full tensor name or its module name.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from .errors import QtoolError
from .quant.spec import QuantSpec

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DENSE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}  # --dtype choices


def dense_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A `--dtype` value (a name, a torch dtype or None) as a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DENSE_DTYPES:
        raise QtoolError("--dtype", f"{dtype!r} is not one of {', '.join(DENSE_DTYPES)}")
    return DENSE_DTYPES[dtype]
# Module names (last part) that hold embeddings or output heads, across common architectures.
_EMBEDDING_PARTS = {"wte", "wpe", "shared", "word_embeddings", "position_embeddings", "token_type_embeddings"}
_HEAD_PARTS = {"lm_head", "embed_out", "output"}
# GPT-2-style Conv1D modules store [in, out] weights and are not nn.Linear: compressed-tensors targets Linear.
# The models whose c_attn/q_attn/c_proj/c_fc are Conv1D (`= Conv1D(` in transformers 5.24 models/); lora uses it too.
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "clvp_decoder"}
CONV1D_PARTS = {"c_attn", "c_proj", "c_fc", "q_attn"}


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    quantize: bool
    reason: str
    linear: bool  # a weight of a linear layer (quantized or listed in `ignore` when not)

    @property
    def module(self) -> str:
        return module_of(self.name)


def module_of(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _matches(name: str, patterns: Sequence[str]) -> str | None:
    module = module_of(name)
    for p in patterns:
        if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(module, p):
            return p
    return None


def tied_embeddings(config: dict | None) -> bool:
    """transformers ties input and output embeddings unless the config says otherwise."""
    if not config:
        return False
    return bool(config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", True)))


def default_role(name: str, shape: tuple[int, ...], dtype: torch.dtype, config: dict | None) -> tuple[bool, bool, str]:
    """(quantize by default, is a linear weight, reason) for one tensor."""
    if dtype not in FLOAT_DTYPES:
        return False, False, f"not floating point ({str(dtype).removeprefix('torch.')})"
    if not name.endswith(".weight"):
        return False, False, "not a weight (bias or buffer)" if len(shape) <= 1 else "not a .weight tensor"
    if len(shape) != 2:
        return False, False, f"{len(shape)}-D tensor (norm or bias)" if len(shape) < 2 else f"{len(shape)}-D tensor"
    last = module_of(name).rsplit(".", 1)[-1]
    if "norm" in last.lower() or last.startswith("ln_"):
        return False, False, "norm"
    if "embed" in last and last not in _HEAD_PARTS or last in _EMBEDDING_PARTS:
        return False, False, "embedding"
    if last in _HEAD_PARTS:
        return False, True, "output head (lm_head)"
    model_type = (config or {}).get("model_type")
    if model_type in CONV1D_MODEL_TYPES and last in CONV1D_PARTS:
        return False, False, "GPT-2 Conv1D weight (compressed-tensors and vLLM quantize nn.Linear only)"
    return True, True, "linear weight"


def plan_quantization(tensors: Iterable, spec: QuantSpec, config: dict | None = None,
                      include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[TensorPlan]:
    """Plan every tensor (objects with .name, .shape, .dtype) of a checkpoint."""
    tied = tied_embeddings(config)
    plans = []
    for t in tensors:
        quantize, linear, reason = default_role(t.name, tuple(t.shape), t.dtype, config)
        inc = _matches(t.name, include)
        exc = _matches(t.name, exclude)
        if exc is not None:
            quantize, reason = False, f"excluded by --exclude {exc!r}"
        elif inc is not None and not quantize:
            if t.dtype not in FLOAT_DTYPES or len(t.shape) != 2:
                raise QtoolError(t.name, f"matched by --include {inc!r} but only 2-D floating weights can be quantized")
            if tied and module_of(t.name).rsplit(".", 1)[-1] in _HEAD_PARTS:
                raise QtoolError(t.name, "is tied to the input embeddings (tie_word_embeddings); quantizing it would untie them on reload")
            quantize, reason = True, f"included by --include {inc!r}"
        if quantize and spec.group_size > 0 and t.shape[1] % spec.group_size:
            raise QtoolError(t.name, f"input width {t.shape[1]} is not a multiple of group size {spec.group_size}; "
                                     f"pass --exclude '{module_of(t.name)}' to keep it unquantized, or choose another --group-size")
        plans.append(TensorPlan(t.name, tuple(t.shape), t.dtype, quantize, reason, linear))
    return plans
