"""The I/O floor: read every tensor with safetensors' safe_open and write it back with save_file, shard by shard.

    python bench/floor.py SRC_FOLDER OUT_FOLDER

Nothing else (no index, no config): the least work any tool that rewrites a checkpoint through torch must do.
"""
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file


def main(src: str, out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for shard in sorted(Path(src).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(out_dir / shard.name), metadata={"format": "pt"})
        del tensors


if __name__ == "__main__":
    main(*sys.argv[1:3])
