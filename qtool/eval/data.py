"""Evaluation windows: the token id sequences DATA is cut into, deterministically.

- text (any suffix but .jsonl/.json/.safetensors): the whole file is one text, tokenized without special tokens
  and cut into consecutive, non-overlapping windows of `seq_len` tokens; the last, shorter window is kept when it
  has at least 2 tokens (the usual perplexity set-up).
- JSONL (.jsonl/.json): each object's string `text` is one window, tokenized without special tokens and cut to
  its first `seq_len` tokens.
- safetensors: each row of `input_ids` [n, L] is one window (positions where `attention_mask` is 0 dropped), cut
  to its first `seq_len` tokens.
A window needs 2 tokens (its first token is never predicted): shorter records and rows are skipped.
`samples` keeps the first N windows. The tokenizer is the first one found in `tokenizer_dirs` (REF, then MODEL).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..calib.data import JSONL_SUFFIXES, jsonl_texts, load_tokenizer, read_text, token_rows
from ..errors import QtoolError


def _tokenizer(path: Path, tokenizer_dirs: list):
    folders = [d for d in tokenizer_dirs if d is not None]
    for d in folders:
        try:
            return load_tokenizer(d)
        except QtoolError:
            continue
    where = folders[0] if folders else path
    raise QtoolError(where, f"no usable tokenizer in {' or '.join(map(str, folders)) or 'a model folder'} to read "
                            f"{path.name}; pass token ids instead (.safetensors with input_ids [n, L])")


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False, verbose=False)["input_ids"]


def _read(path: Path, tokenizer_dirs: list, seq_len: int) -> list[torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return token_rows(path, None, seq_len)
    if suffix in JSONL_SUFFIXES:
        texts = [t for t in jsonl_texts(path) if t.strip()]
        if not texts:
            raise QtoolError(path, "holds no record with a non-empty 'text'")
        tok = _tokenizer(path, tokenizer_dirs)
        return [torch.tensor(_encode(tok, t)[:seq_len], dtype=torch.long) for t in texts]
    text = read_text(path)
    if not text.strip():
        raise QtoolError(path, "holds no text")
    ids = torch.tensor(_encode(_tokenizer(path, tokenizer_dirs), text), dtype=torch.long)
    return list(ids.split(seq_len))


def load_windows(path, tokenizer_dirs: list, seq_len: int = 512, samples: int | None = None) -> list[torch.Tensor]:
    """The evaluation windows of DATA: 1-D LongTensors of 2 to `seq_len` tokens (see the module doc)."""
    path = Path(path)
    if seq_len < 2:
        raise QtoolError(path, f"--seq-len must be at least 2 (a window's first token is never predicted), not {seq_len}")
    if samples is not None and samples < 1:
        raise QtoolError(path, f"--samples must be at least 1, not {samples}")
    if not path.is_file():
        raise QtoolError(path, "no such data file" if not path.exists() else "data must be a file (text, JSONL or safetensors token ids)")
    if path.stat().st_size == 0:
        raise QtoolError(path, "is empty")
    windows = [w for w in _read(path, tokenizer_dirs, seq_len) if w.numel() >= 2]
    if not windows:
        raise QtoolError(path, "holds fewer than 2 tokens per window: nothing to predict")
    return windows if samples is None else windows[:samples]
