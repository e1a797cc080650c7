"""Open any checkpoint lazily: list names, shapes and dtypes without reading data; read one tensor at a time.

Sources: a folder (safetensors single or sharded with an index, PyTorch .bin single or sharded, a PEFT adapter),
a single .safetensors/.bin/.pt file, or a hub id found in the local huggingface-hub cache.
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..errors import QtoolError
from . import jsonfile
from .info import TensorInfo
from .layout import INDEX_SUFFIX, WEIGHT_SUFFIXES, side_files
from .pickled import PickledFile
from .safetensors_header import read_header


class SafetensorsFile:
    """One checked safetensors file; reads a tensor straight into a fresh torch buffer."""

    def __init__(self, path: Path):
        self.path = path
        self.entries, self.metadata, _ = read_header(path)

    def infos(self) -> Iterator[TensorInfo]:
        for name, e in self.entries.items():
            yield TensorInfo(name, e["shape"], e["dtype"], self.path, e["nbytes"])

    def get(self, name: str) -> torch.Tensor:
        """The tensor as a private (copy-on-write) memory map of its bytes: nothing is copied, pages come from the
        page cache as they are touched (the kernel is asked to read them ahead), and the mapping goes away with the
        tensor. Writing to it never reaches the file."""
        e = self.entries[name]
        if not e["nbytes"]:
            return torch.empty(e["shape"], dtype=e["dtype"])
        start = e["start"]
        base = start - start % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size < start + e["nbytes"]:  # shrunk since the header was checked: mapping it would crash on access
                raise QtoolError(self.path, f"tensor {name!r}: file ended early ({size} bytes, tensor ends at {start + e['nbytes']})")
            m = mmap.mmap(f.fileno(), start + e["nbytes"] - base, access=mmap.ACCESS_COPY, offset=base)
        if hasattr(m, "madvise"):
            m.madvise(mmap.MADV_WILLNEED)
        flat = torch.frombuffer(m, dtype=e["dtype"], count=e["nbytes"] // e["dtype"].itemsize, offset=start - base)
        return flat.view(e["shape"])


class Checkpoint:
    """A lazily opened checkpoint: `tensors` (name → TensorInfo, sorted), `get(name)`, `config`."""

    def __init__(self, path: Path, root: Path, files: list[Path], weight_map: dict[str, str] | None = None):
        self.path = path          # what the user named (after hub resolution)
        self.root = root          # the folder holding it (a single file's parent)
        self.is_folder = path.is_dir()
        self.files = files
        self._handles = {}
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            handle = _open_weight_file(f)
            self._handles[f] = handle
            for info in handle.infos():
                if weight_map is not None and weight_map.get(info.name) != os.path.relpath(f, root).replace(os.sep, "/"):
                    continue  # the index is the allow-list: a tensor it does not map to this shard is not ours
                if info.name in tensors:
                    raise QtoolError(f, f"tensor {jsonfile.brief(info.name)} is also in {tensors[info.name].file.name}")
                tensors[info.name] = info
        if weight_map is not None:
            for name, shard in weight_map.items():
                if name not in tensors:
                    raise QtoolError(root / shard, f"tensor {jsonfile.brief(name)} is listed in the index but missing from the shard")
        self.tensors: dict[str, TensorInfo] = dict(sorted(tensors.items()))
        self.config = self._read_json("config.json", jsonfile.CONFIG)
        self.adapter_config = self._read_json("adapter_config.json", jsonfile.ADAPTER_CONFIG)

    @property
    def storage(self) -> str:
        """How the weights are stored: safetensors | pytorch (what they mean is for qtool.formats to say)."""
        return "safetensors" if all(f.suffix == ".safetensors" for f in self.files) else "pytorch"

    def _read_json(self, name: str, schema) -> dict | None:
        p = self.root / name
        if not self.is_folder or not p.is_file():
            return None
        return jsonfile.read(p, name, schema)

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors.get(name)
        if info is None:
            raise QtoolError(self.path, f"no tensor named {name!r}")
        return self._handles[info.file].get(name)

    def iter(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in (self.tensors if names is None else names):
            yield name, self.get(name)

    def shard_of(self, name: str) -> str:
        return os.path.relpath(self.tensors[name].file, self.root).replace(os.sep, "/")

    def extra_files(self) -> list[Path]:
        """The side files of a folder source (checkpoint.layout: config, tokenizer, generation config, chat
        template, model card, licence; top level only), to carry into outputs."""
        return side_files(self.root) if self.is_folder else []

    def __repr__(self):
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors, {self.storage}, {len(self.files)} files)"


def _open_weight_file(path: Path):
    if not path.is_file():
        raise QtoolError(path, "missing file")
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    return PickledFile(path)


def _index_files(root: Path, index_path: Path) -> tuple[list[Path], dict[str, str]]:
    index = jsonfile.read(index_path, "the index", jsonfile.INDEX)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise QtoolError(index_path, "not a valid index: no weight_map of tensor names to shard files")
    real_root = root.resolve()
    shards = []
    for shard in sorted(set(weight_map.values())):
        p = Path(shard)
        try:
            outside = p.is_absolute() or ".." in p.parts or not (root / p).resolve().is_relative_to(real_root)
            found = not outside and (root / p).is_file()
        except (OSError, ValueError):  # a name the file system cannot hold (NUL, too long)
            raise QtoolError(index_path, f"shard {jsonfile.brief(shard)} is not a usable file name") from None
        if outside:
            raise QtoolError(index_path, f"shard {jsonfile.brief(shard)} lies outside the checkpoint folder")
        if not found:
            raise QtoolError(root / p, f"shard listed in {index_path.name} is missing")
        shards.append(root / p)
    return shards, {k: str(Path(v).as_posix()) for k, v in weight_map.items()}


def _open_folder(root: Path) -> Checkpoint:
    # Preference order: the names transformers and PEFT write, then any weights that are there.
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (root / index_name).is_file():
            files, weight_map = _index_files(root, root / index_name)
            return Checkpoint(root, root, files, weight_map)
    for single in ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin"):
        if (root / single).is_file():
            return Checkpoint(root, root, [root / single])
    indexes = sorted(root.glob("*" + INDEX_SUFFIX))
    if len(indexes) == 1:
        files, weight_map = _index_files(root, indexes[0])
        return Checkpoint(root, root, files, weight_map)
    for suffixes in ((".safetensors",), (".bin", ".pt", ".pth")):
        files = sorted(p for p in root.iterdir() if p.suffix in suffixes and p.is_file())
        if files:
            return Checkpoint(root, root, files)
    raise QtoolError(root, "not a checkpoint: no .safetensors, .bin or .pt weights found")


def looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and "\\" not in source


def open_checkpoint(source: str | os.PathLike, revision: str | None = None) -> Checkpoint:
    """Open a checkpoint from a path or a hub id in the local cache. Reads headers only."""
    path = Path(source)
    if not path.exists():
        if isinstance(source, str) and looks_like_hub_id(source):
            from .hub import resolve_cached
            path = resolve_cached(source, revision)
        else:
            raise QtoolError(source, "no such file or folder")
    if path.is_dir():
        return _open_folder(path)
    if path.suffix in WEIGHT_SUFFIXES:
        return Checkpoint(path, path.parent, [path])
    if path.name.endswith(INDEX_SUFFIX):
        files, weight_map = _index_files(path.parent, path)
        return Checkpoint(path.parent, path.parent, files, weight_map)
    raise QtoolError(path, "not a checkpoint: expected a folder, a .safetensors, .bin or .pt file, or an index")
