"""Calibration: run data through a model (transformers, the optional `calib` extra) block by block on cpu or cuda,
collect per-channel input statistics, and quantize with them. transformers is imported only when a model runs."""
from .data import is_stats_file, load_calibration
from .layerwise import collect_stats, layer_order, quantize_layerwise
from .stats import load_stats, read_stats, save_stats

__all__ = ["collect_stats", "is_stats_file", "layer_order", "load_calibration", "load_stats", "quantize_layerwise",
           "read_stats", "save_stats"]
