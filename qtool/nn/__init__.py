"""Run and train on what qtool writes: a linear layer on packed int4/int8 weights (torch's weight-only kernels
where they apply), LoRA adapters swapped, trained and saved on a shared base, loading a compressed-tensors
checkpoint into a torch model, and what a live model costs."""
from .accounting import lora_training_memory, memory_footprint, parameter_counts
from .adapters import add_adapter, save_adapter
from .load import load
from .lora import LoRALinear, adapter_names, attach_adapter, detach_adapter, set_adapter, set_trainable
from .quant_linear import QuantLinear

__all__ = ["LoRALinear", "QuantLinear", "add_adapter", "adapter_names", "attach_adapter", "detach_adapter", "load",
           "lora_training_memory", "memory_footprint", "parameter_counts", "save_adapter", "set_adapter",
           "set_trainable"]
