"""Which files belong to a checkpoint folder: its weights, their index, and the side files a checkpoint carries.

Side files are the folder's own files of these kinds, and nothing else: the model config (with a multimodal
model's processor configs and a sentence-transformers pipeline: modules.json and the module folders it names),
tokenizer files, generation config, chat template, model card, licence, and the custom code that config.json's
`auto_map` names. Other subfolders (`onnx/`, `original/`, earlier outputs nested in the folder, qtool's temporary
folders) and weights of other formats (`*.gguf`) are never side files. The same rules say what `--overwrite` may
replace: a folder holding only such files.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

INDEX_SUFFIX = ".index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

SIDE_FILE_NAMES = frozenset({
    # model config, generation config, processor configs
    "config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json",
    # sentence-transformers pipeline (its module folders come from modules.json)
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
    # tokenizers (fast, sentencepiece, BPE vocabularies) and their special tokens
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.tiktoken",
    # chat templates
    "chat_template.json", "chat_template.jinja",
    # model card
    "README.md",
})
# licence documents: LICENSE, LICENSE.txt, LICENCE-MIT, COPYING, NOTICE, USE_POLICY.md (any case)
_LICENCE = re.compile(r"(licen[cs]e|copying|notice|use_policy)([-_][a-z0-9]+)?(\.(txt|md|rst|html))?", re.IGNORECASE)
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def is_index_file(name: str) -> bool:
    return name.endswith(INDEX_SUFFIX) and any(name[: -len(INDEX_SUFFIX)].endswith(s) for s in WEIGHT_SUFFIXES)


def is_side_file(name: str) -> bool:
    """A top-level file name a checkpoint carries beside its weights."""
    return name in SIDE_FILE_NAMES or bool(_LICENCE.fullmatch(name))


def side_files(folder: Path) -> list[Path]:
    """The side files of a checkpoint folder, sorted (regular files, links to files included)."""
    folder = Path(folder)
    top = {e.name for e in os.scandir(folder) if e.is_file()}
    names = {n for n in top if is_side_file(n)} | {f"{m}.py" for m in _auto_map_modules(folder)} & top
    for sub in _pipeline_folders(folder):
        names |= {f"{sub}/{e.name}" for e in os.scandir(folder / sub) if e.is_file()}
    return [folder / n for n in sorted(names)]


def _json(path: Path):
    from .jsonfile import parse
    try:
        return parse(path.read_bytes(), path)
    except Exception:  # a side file that is not valid JSON is copied as it is and names nothing more
        return None


def _auto_map_modules(folder: Path) -> set[str]:
    """Python modules config.json's `auto_map` names ("modeling_x.ModelClass" -> modeling_x)."""
    cfg = _json(folder / "config.json") if (folder / "config.json").is_file() else None
    refs = cfg.get("auto_map") if isinstance(cfg, dict) else None
    refs = list(refs.values()) if isinstance(refs, dict) else []
    out = set()
    for ref in (r for v in refs for r in (v if isinstance(v, list) else [v])):
        if isinstance(ref, str) and "." in ref:
            module = ref.split("--")[-1].rsplit(".", 1)[0]
            if _PLAIN_NAME.fullmatch(module):
                out.add(module)
    return out


def _pipeline_folders(folder: Path) -> list[str]:
    """The sentence-transformers module folders that modules.json names (one level, plain names)."""
    mods = _json(folder / "modules.json") if (folder / "modules.json").is_file() else None
    paths = [m.get("path") for m in mods if isinstance(m, dict)] if isinstance(mods, list) else []
    return sorted({p for p in paths if isinstance(p, str) and _PLAIN_NAME.fullmatch(p) and (folder / p).is_dir()
                   and not (folder / p).is_symlink()})


ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter folder's config, beside adapter_model weights


def foreign_entry(folder: Path) -> str | None:
    """The first entry (sorted, as a path relative to `folder`) that a checkpoint folder does not hold, or None:
    weights, indexes, side files; in subfolders, weight shards (an index may place them there). A PEFT adapter
    folder (qtool.save_adapter's output) is a checkpoint folder too: its adapter_config.json belongs to it."""
    allowed = {p.relative_to(folder).as_posix() for p in side_files(folder)}
    if any(e.name.startswith("adapter_model.") and is_weight_file(e.name) for e in os.scandir(folder)):
        allowed.add(ADAPTER_CONFIG)
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = Path(dirpath).relative_to(folder)
        top = rel == Path(".")
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in sorted(filenames + links):
            path, where = os.path.join(dirpath, name), (rel / name).as_posix()
            ok = os.path.isfile(path) and (where in allowed or is_weight_file(name) or top and is_index_file(name))
            if not ok:
                return where
        dirnames[:] = sorted(d for d in dirnames if d not in links)
    return None


def holds_weights(folder: Path) -> bool:
    return any(is_weight_file(e.name) or is_index_file(e.name) for e in os.scandir(folder))
