"""Files and folders: writing them so that a killed process never leaves a half-written one under its final name,
and finding a model's folder by path or hub repo id.

Everything is written under a temporary name in the destination's own folder (the same file system, so the final
rename is atomic) that holds the process id, so processes writing side by side never share one.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from unialignment.errors import UserError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to; renamed to `path` when the block ends without an error, removed
    otherwise. `path` is whole or untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside `path` to fill; moved into place when the block ends without an error (replacing
    an existing `path` only with `overwrite`), removed otherwise. `path` is complete or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        yield temporary
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(temporary, path)
            shutil.rmtree(old)
        else:
            os.replace(temporary, path)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)


# A hub repo id as diffusers and transformers take it: "organisation/name".
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")


def is_repo_id(name: str | Path) -> bool:
    return isinstance(name, str) and REPO_ID.fullmatch(name) is not None and not Path(name).exists()


def model_folder(name: str | Path, what: str = "model") -> Path:
    """A local folder for `name`: the folder itself, or a hub repo id ("org/name") resolved through huggingface_hub's
    cache, as diffusers and transformers resolve one: the snapshot a `huggingface-cli download` left there, fetched
    first when online; with HF_HUB_OFFLINE=1 nothing is fetched. Only files are fetched: no code from a model folder
    is ever imported (no `trust_remote_code`, no custom pipelines)."""
    if not is_repo_id(name):
        return Path(name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(snapshot_download(name))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as error:
        raise UserError(
            f"{what} {name}: not a folder here, and the hub repo {name} is not in huggingface_hub's cache and could "
            f"not be fetched ({type(error).__name__}); download it first (huggingface-cli download {name}) or give "
            "a local folder"
        ) from None
