"""Run what qtool writes: a linear layer on packed int4/int8 weights, LoRA adapters swapped on a shared base,
loading a compressed-tensors checkpoint into a torch model, and what a live model costs."""
from .accounting import lora_training_memory, memory_footprint, parameter_counts
from .load import load
from .lora import LoRALinear, adapter_names, attach_adapter, detach_adapter, set_adapter
from .quant_linear import QuantLinear

__all__ = ["LoRALinear", "QuantLinear", "adapter_names", "attach_adapter", "detach_adapter", "load",
           "lora_training_memory", "memory_footprint", "parameter_counts", "set_adapter"]
