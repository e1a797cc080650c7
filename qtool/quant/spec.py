"""What a quantization scheme is: bits, symmetry, grouping, and the scale-search method."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import ArgumentError

METHODS = ("rtn", "mse", "gptq", "awq", "awq+gptq")
# Activation-aware scaling runs in the calibrated layer walk, then quantizes the scaled weights with this method.
AWQ_THEN = {"awq": "mse", "awq+gptq": "gptq"}
# The contract's grouping when none is asked for: int4 → groups of 128 input columns, int8 → one scale per channel.
DEFAULT_GROUP_SIZE = {4: 128, 8: -1}


@dataclass(frozen=True)
class QuantSpec:
    """A weight-only integer scheme.

    group_size: N > 0 groups of N input columns; -1 one scale per output channel; 0 one scale per tensor;
    None (the default) the contract's default for `bits` (int4: 128, int8: -1), so `QuantSpec(bits=8)` is per channel
    here as on the command line. Values are stored signed in [-2^(bits-1), 2^(bits-1) - 1]; x̂ = (q - zero_point) * scale.
    """

    bits: int = 4
    symmetric: bool = True
    group_size: int | None = None
    method: str = "mse"

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in DEFAULT_GROUP_SIZE:
            raise ArgumentError("bits", f"must be 4 or 8, not {self.bits!r}")
        if not isinstance(self.symmetric, bool):
            raise ArgumentError("symmetric", f"must be True or False, not {self.symmetric!r}")
        if self.group_size is None:
            object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE[self.bits])
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < -1:
            raise ArgumentError("group_size", f"must be N > 0, -1 (per channel) or 0 (per tensor), not {self.group_size!r}")
        if self.method not in METHODS:
            raise ArgumentError("method", f"must be one of {', '.join(METHODS)}, not {self.method!r}")

    @classmethod
    def default(cls, bits: int = 4, method: str = "mse") -> "QuantSpec":
        """The contract's scheme for `bits` (the same as QuantSpec(bits=bits, method=method))."""
        return cls(bits=bits, method=method)

    def with_method(self, method: str) -> "QuantSpec":
        return replace(self, method=method)

    @property
    def awq(self) -> bool:
        """Activation-aware scaling first (methods awq, awq+gptq)."""
        return self.method in AWQ_THEN

    @property
    def weight_method(self) -> str:
        """How each weight is quantized once any scaling is done: mse after awq, gptq after awq+gptq."""
        return AWQ_THEN.get(self.method, self.method)

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def strategy(self) -> str:
        """compressed-tensors' name for the grouping: tensor, channel or group."""
        if self.group_size == 0:
            return "tensor"
        if self.group_size == -1:
            return "channel"
        return "group"

    def n_groups(self, in_features: int) -> int:
        """Scale columns per output row."""
        if self.group_size > 0:
            return -(-in_features // self.group_size)
        return 1

    def group_width(self, in_features: int) -> int:
        """Input columns covered by one scale."""
        return self.group_size if self.group_size > 0 else in_features

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        """Shape of the scales (and zero points) of an [out, in] weight: (1,) per tensor, else [out, n_groups]."""
        if self.strategy == "tensor":
            return (1,)
        return (out_features, self.n_groups(in_features))


# --- the SPEC grammar of --scheme and --candidates -----------------------------------------------------------------
# `int4` / `int8`, then optional parts `:g32|:g64|:g128|:channel|:tensor` and `:sym|:asym`, or `dense` (left
# unquantized). Parts a SPEC leaves out take the run's global options.
DENSE = "dense"
SPEC_BITS = {"int4": 4, "int8": 8}
SPEC_GROUPINGS = {"g32": 32, "g64": 64, "g128": 128, "channel": -1, "tensor": 0}
SPEC_SYMMETRY = {"sym": True, "asym": False}


def parse_spec(text: str, *, symmetric: bool = True, group_size: int | None = None,
               method: str = "mse") -> QuantSpec | None:
    """A SPEC as a QuantSpec, None for `dense`. `symmetric`, `group_size` (None: the bits' default) and `method` are
    the global options that fill the parts the SPEC leaves out. Raises ValueError naming what is wrong."""
    words = text.strip().lower().split(":")
    if words == [DENSE]:
        return None
    if words[0] not in SPEC_BITS:
        raise ValueError(f"{text!r} is not a SPEC: it starts with int4, int8 or is 'dense'")
    grouping = symmetry = None
    for part in words[1:]:
        if part in SPEC_GROUPINGS and grouping is None:
            grouping = SPEC_GROUPINGS[part]
        elif part in SPEC_SYMMETRY and symmetry is None:
            symmetry = SPEC_SYMMETRY[part]
        else:
            raise ValueError(f"{text!r} is not a SPEC: {part!r} is not one of "
                             f"{', '.join(p for p in (*SPEC_GROUPINGS, *SPEC_SYMMETRY))} (each at most once)")
    return QuantSpec(bits=SPEC_BITS[words[0]], symmetric=symmetric if symmetry is None else symmetry,
                     group_size=group_size if grouping is None else grouping, method=method)


def spec_text(spec: QuantSpec | None) -> str:
    """The canonical SPEC of `spec`: `int4:g128`, `int8:channel:asym`, `dense` (symmetry is written only when
    asymmetric, read as the command line's defaults read it)."""
    if spec is None:
        return DENSE
    grouping = {"tensor": "tensor", "channel": "channel"}.get(spec.strategy, f"g{spec.group_size}")
    return f"int{spec.bits}:{grouping}" + ("" if spec.symmetric else ":asym")
