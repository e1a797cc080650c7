"""Open checkpoints lazily and write them atomically."""
from .info import TensorInfo
from .reader import Checkpoint, open_checkpoint
from .writer import CheckpointWriter

__all__ = ["Checkpoint", "CheckpointWriter", "TensorInfo", "open_checkpoint"]
