"""What a quantization scheme is: bits, symmetry, grouping, and the scale-search method."""
from __future__ import annotations

from dataclasses import dataclass

METHODS = ("rtn", "mse", "gptq")


@dataclass(frozen=True)
class QuantSpec:
    """A weight-only integer scheme.

    group_size: N > 0 groups of N input columns; -1 one scale per output channel; 0 one scale per tensor.
    Values are stored signed in [-2^(bits-1), 2^(bits-1) - 1]; x̂ = (q - zero_point) * scale.
    """

    bits: int = 4
    symmetric: bool = True
    group_size: int = 128
    method: str = "mse"

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {self.bits}")
        if self.group_size < -1:
            raise ValueError(f"group size must be N > 0, -1 (per channel) or 0 (per tensor), not {self.group_size}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")

    @classmethod
    def default(cls, bits: int = 4, method: str = "mse") -> "QuantSpec":
        """Defaults of the contract: int4 symmetric group 128; int8 symmetric per channel."""
        return cls(bits=bits, symmetric=True, group_size=128 if bits == 4 else -1, method=method)

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
