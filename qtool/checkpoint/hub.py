"""Hub ids resolved from the local huggingface-hub cache only: nothing is downloaded at run time."""
from __future__ import annotations

from pathlib import Path

from ..errors import QtoolError


def resolve_cached(repo_id: str, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        rev = f" at revision {revision}" if revision else ""
        raise QtoolError(repo_id, f"not found in the local hugging face cache{rev} (qtool never downloads; "
                                  f"fetch it first with `hf download {repo_id}` or pass a local path)") from None
    except HFValidationError as e:
        raise QtoolError(repo_id, f"not a valid hub id ({e})") from None
