"""Caching a benchmark's expensive steps on disk, so that a rerun redoes only what changed and an interrupted run
resumes where it stopped. Shared by every benchmark entry.

Each step's result lives under a name derived from exactly what determines it (`cache_key`), and is written through a
staging folder or file that is moved into place only when complete (`cached_directory`, `cached_json`): a step
killed halfway leaves nothing that a rerun would take for a finished result.
"""

import hashlib
import json
import resource
from collections.abc import Callable
from pathlib import Path

from peft_cvae.file_utils import atomic_directory, read_json, write_json

__all__ = ["cache_key", "cached_directory", "cached_json", "peak_rss_mb"]


def cache_key(values: dict, *parts) -> str:
    """A short hash of `values` (e.g. the settings fields a step depends on) and any extra parts: a cache entry's
    name. Keys are sorted and non-JSON values written with `str`, so equal settings always give the same name."""
    text = json.dumps([values, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cached_directory(folder: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """Return `folder`, running `build(staging)` first unless `folder / marker` exists (a finished earlier run).

    `build` writes everything, `marker` included, into a staging folder that replaces `folder`'s files only when it
    returns (`peft_cvae.file_utils.atomic_directory`); if it raises, `folder` is left as it was.
    """
    if not (folder / marker).exists():
        with atomic_directory(folder) as staging:
            build(staging)
    return folder


def cached_json(path: Path, compute: Callable[[], object], *, what: str = "cached result"):
    """The JSON stored at `path`, computed with `compute()` and written atomically the first time."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(compute(), path)
    return read_json(path, what=what)


def peak_rss_mb() -> float:
    """The peak resident memory of this process so far, in MiB (Linux reports `ru_maxrss` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
