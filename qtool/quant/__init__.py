"""Pure tensor math of quantization (no I/O): specs, min-max RTN, MSE scale search, GPTQ, bit packing."""
from .core import dequantize, error_stats, fake_quantize, minmax_qparams, quantize, scale_dtype_for
from .gptq import gptq_quantize, output_error
from .pack import pack_int32, packed_len, unpack_int32
from .search import choose_qparams, mse_qparams
from .spec import QuantSpec

__all__ = [
    "QuantSpec", "minmax_qparams", "quantize", "dequantize", "fake_quantize", "error_stats",
    "scale_dtype_for", "mse_qparams", "choose_qparams", "gptq_quantize", "output_error", "pack_int32", "unpack_int32",
    "packed_len",
]
