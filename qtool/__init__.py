"""qtool: quantize checkpoints to int8/int4 (compressed-tensors), merge LoRA adapters, report sizes and errors."""
__version__ = "0.1.0"
