"""Calibration samples: token id sequences read from a text file, a JSONL file or a safetensors file of ids.

Which samples, deterministically:
- text (any suffix but .jsonl/.json/.safetensors): one sample per line; the first `samples` non-empty lines
  (stripped), in file order.
- JSONL (.jsonl/.json): one JSON object per line with a string `text`; the first `samples` objects whose text
  is not empty. Blank lines are skipped.
- safetensors: `input_ids` [n, L] integers (optionally `attention_mask` [n, L]: positions where it is 0 are
  dropped); the first `samples` rows.
Text is tokenized with the source's own tokenizer (transformers' AutoTokenizer, offline) with its special tokens
(BERT gets [CLS] ... [SEP]); every sample is cut to its first `seq_len` tokens. Samples are never padded:
each runs through the model on its own, so no padding token ever enters the statistics.
"""
from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import torch

from ..checkpoint.outputs import STATS_FORMAT
from ..errors import QtoolError

JSONL_SUFFIXES = (".jsonl", ".json")


def _safetensors_metadata(path: Path) -> dict:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise QtoolError(path, f"not a valid safetensors file ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def is_stats_file(path: str | Path) -> bool:
    """True for a statistics file written by `qtool calibrate` (its metadata names the format)."""
    path = Path(path)
    return path.suffix == ".safetensors" and path.is_file() and _safetensors_metadata(path).get("format") == STATS_FORMAT


def _check_counts(path: Path, samples: int, seq_len: int) -> None:
    if samples < 1:
        raise QtoolError(path, f"--calib-samples must be at least 1, not {samples}")
    if seq_len < 1:
        raise QtoolError(path, f"--seq-len must be at least 1, not {seq_len}")


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QtoolError(path, f"text is not utf-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise QtoolError(path, f"cannot read the file ({e.strerror})") from None


def jsonl_texts(path: Path):
    """The string `text` of each JSON object per line (blank lines skipped), in file order."""
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise QtoolError(path, f"line {lineno} is not valid JSON ({e.msg})") from None
        except (RecursionError, ValueError):  # nested too deeply, or an integer too long to read
            raise QtoolError(path, f"line {lineno} is not valid JSON (nested too deeply or a number too long)") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise QtoolError(path, f"line {lineno} has no string field 'text'")
        yield obj["text"]


def _texts(path: Path, samples: int) -> list[str]:
    if path.suffix.lower() in JSONL_SUFFIXES:
        texts = (t for t in jsonl_texts(path) if t.strip())
    else:
        texts = (line.strip() for line in read_text(path).splitlines() if line.strip())
    texts = list(islice(texts, samples))  # lines past the first `samples` are not parsed
    if not texts:
        raise QtoolError(path, "calibration file holds no non-empty samples")
    return texts


def load_tokenizer(tokenizer_dir: str | Path | None):
    """The source's tokenizer, offline; a clear error when there is none."""
    if tokenizer_dir is None:
        raise QtoolError("--calib", "text calibration data needs a tokenizer, but the source is not a folder; "
                                    "pass token ids as a safetensors file (input_ids [n, L])")
    from .model import require_transformers
    transformers = require_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/... depending on what is missing
        raise QtoolError(tokenizer_dir, f"no usable tokenizer in the source folder ({type(e).__name__}); "
                                        "pass token ids as a safetensors file (input_ids [n, L]) instead") from None


def _tokenize(texts: list[str], tokenizer_dir, seq_len: int) -> list[torch.Tensor]:
    tok = load_tokenizer(tokenizer_dir)
    out = []
    for t in texts:
        ids = tok(t, add_special_tokens=True, truncation=True, max_length=seq_len)["input_ids"]
        out.append(torch.tensor(ids, dtype=torch.long))
    return out


def token_rows(path: Path, samples: int | None, seq_len: int) -> list[torch.Tensor]:
    """The first `samples` rows of `input_ids` (all when None), masked positions dropped, cut to `seq_len`."""
    from safetensors.torch import load_file
    if _safetensors_metadata(path).get("format") == STATS_FORMAT:
        raise QtoolError(path, "is a calibration statistics file, not calibration data (it can only feed --method mse)")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # a header safe_open accepted but data torch cannot hold (dtype, size)
        raise QtoolError(path, f"not a readable safetensors file ({_first_line(e)})") from None
    ids = tensors.get("input_ids")
    if ids is None:
        raise QtoolError(path, "safetensors token data needs a tensor 'input_ids' [samples, tokens]")
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    if ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise QtoolError(path, f"'input_ids' must be a 2-D integer tensor, not {tuple(ids.shape)} {ids.dtype}")
    mask = tensors.get("attention_mask")
    if mask is not None and mask.shape != ids.shape:
        raise QtoolError(path, f"'attention_mask' {tuple(mask.shape)} does not match 'input_ids' {tuple(ids.shape)}")
    out = []
    for i in range(ids.shape[0] if samples is None else min(samples, ids.shape[0])):
        row = ids[i] if mask is None else ids[i][mask[i] != 0]
        if row.numel():
            out.append(row[:seq_len].long().clone())
    return out


def load_calibration(path: str | Path, tokenizer_dir: str | Path | None, samples: int = 128,
                     seq_len: int = 512) -> list[torch.Tensor]:
    """Up to `samples` 1-D LongTensors of at most `seq_len` token ids (see the module doc for which ones)."""
    path = Path(path)
    _check_counts(path, samples, seq_len)
    if not path.exists():
        raise QtoolError(path, "no such calibration file")
    if not path.is_file():
        raise QtoolError(path, "calibration data must be a file (text, JSONL or safetensors token ids)")
    if path.stat().st_size == 0:
        raise QtoolError(path, "calibration file is empty")
    if path.suffix.lower() == ".safetensors":
        out = token_rows(path, samples, seq_len)
    else:
        out = _tokenize(_texts(path, samples), tokenizer_dir, seq_len)
    out = [ids for ids in out if ids.numel()]
    if not out:
        raise QtoolError(path, "calibration data holds no tokens")
    return out
