"""PEFT LoRA adapters: read them, match them to a base checkpoint, and merge them exactly as peft 0.21.2 does."""
from .adapter import Adapter, LoraModule, read_adapter
from .config import LoraSettings, parse_adapter_config, pattern_key
from .merge import LoraTerm, delta_weight, merge_bias, merge_weight
from .plan import MergePlan, ModuleWeight, TensorOp, plan_merge
from .targets import classify_key, is_conv1d, is_targeted

__all__ = ["Adapter", "LoraModule", "LoraSettings", "LoraTerm", "MergePlan", "ModuleWeight", "TensorOp",
           "classify_key", "delta_weight", "is_conv1d", "is_targeted", "merge_bias", "merge_weight",
           "parse_adapter_config", "pattern_key", "plan_merge", "read_adapter"]
