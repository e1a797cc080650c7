"""Open checkpoints lazily and write them atomically."""
from .reader import Checkpoint, TensorInfo, open_checkpoint
from .writer import CheckpointWriter

__all__ = ["Checkpoint", "CheckpointWriter", "TensorInfo", "open_checkpoint"]
