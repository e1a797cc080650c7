"""Pure tensor math of quantization (no I/O): specs, min-max RTN, MSE scale search, GPTQ, bit packing, and
`quantize_weight`, the one entry that quantizes a weight by its spec's method."""
from .core import dequantize, error_stats, quantize, scale_dtype_for
from .gptq import gptq_quantize, output_error
from .pack import pack_int32, packed_len, unpack_int32
from .qparams import choose_qparams, fake_quantize, minmax_qparams, mse_qparams
from .spec import QuantSpec
from .weight import QuantizedWeight, quantize_weight

__all__ = [
    "QuantSpec", "QuantizedWeight", "quantize_weight", "minmax_qparams", "quantize", "dequantize", "fake_quantize",
    "error_stats", "scale_dtype_for", "mse_qparams", "choose_qparams", "gptq_quantize", "output_error", "pack_int32",
    "unpack_int32", "packed_len",
]
