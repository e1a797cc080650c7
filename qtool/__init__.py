"""qtool: quantize checkpoints to int8/int4 (compressed-tensors), merge LoRA adapters, report sizes and errors.

The Python API is what the command line calls:

    import qtool
    report = qtool.quantize("model/", "model-int4/", qtool.QuantSpec(bits=4, group_size=128, method="mse"))
    report = qtool.inspect("model-int4/", against="model/")
    report = qtool.merge_lora("model/", ["adapter/"], "merged/")
    model = qtool.load("model-int4/")                    # QuantLinear modules run from the packed bytes
    name = qtool.attach_adapter(model, "adapter/")
    qtool.add_adapter(model, r=16, alpha=32, targets="all-linear", name="new")  # QLoRA: train it, then
    qtool.save_adapter(model, "new", "new-adapter/")                 # a PEFT folder merge-lora merges

Names load lazily so that `qtool --help` does not pay for importing torch.
"""
__version__ = "0.1.0"

_API = {
    "inspect": ("qtool.jobs.inspect", "inspect"),
    "quantize": ("qtool.jobs.quantize", "quantize"),
    "dequantize": ("qtool.jobs.dequantize", "dequantize"),
    "merge_lora": ("qtool.jobs.merge", "merge_lora"),
    "calibrate": ("qtool.jobs.calibrate", "calibrate"),
    "load": ("qtool.nn.load", "load"),
    "attach_adapter": ("qtool.nn.lora", "attach_adapter"),
    "add_adapter": ("qtool.nn.adapters", "add_adapter"),
    "save_adapter": ("qtool.nn.adapters", "save_adapter"),
    "set_adapter": ("qtool.nn.lora", "set_adapter"),
    "set_trainable": ("qtool.nn.lora", "set_trainable"),
    "QuantLinear": ("qtool.nn.quant_linear", "QuantLinear"),
    "LoRALinear": ("qtool.nn.lora", "LoRALinear"),
    "parameter_counts": ("qtool.nn.accounting", "parameter_counts"),
    "memory_footprint": ("qtool.nn.accounting", "memory_footprint"),
    "lora_training_memory": ("qtool.nn.accounting", "lora_training_memory"),
    "QuantSpec": ("qtool.quant.spec", "QuantSpec"),
    "open_checkpoint": ("qtool.checkpoint", "open_checkpoint"),
    "QtoolError": ("qtool.errors", "QtoolError"),
    "ArgumentError": ("qtool.errors", "ArgumentError"),
}
__all__ = ["__version__", *_API]


def __getattr__(name):
    if name in _API:
        import importlib
        module, attr = _API[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qtool' has no attribute {name!r}")
