"""BIG-bench's task files, offline: download the PyPI sdist once, check it, extract only the `task.json` files.

BIG-bench ships its 1,041 `task.json` files inside the PyPI sdist `bigbench==1.0.0` (358 MB). Installing that package
pulls TensorFlow, so it is never installed: `pip download --no-deps` fetches the archive, its sha256 is checked
against the one recorded here (and written next to it, so a report can cite it), and a single pass over the tarball
extracts the `bigbench/benchmark_tasks/**/task.json` members with a progress bar. Both steps write under a temporary
name and rename into place, so an interrupted run never leaves a half-written archive or task folder that a rerun
would trust.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from peft_cvae.errors import CorruptFileError, MissingFileError
from peft_cvae.file_utils import read_json, sha256_file, write_json

__all__ = [
    "SDIST_NAME",
    "SDIST_SHA256",
    "SDIST_REQUIREMENT",
    "ensure_sdist",
    "extract_task_files",
    "load_task_files",
    "ensure_task_files",
]

SDIST_REQUIREMENT = "bigbench==1.0.0"
SDIST_NAME = "bigbench-1.0.0.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"  # PyPI's file, measured 2026-11-24
TASKS_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"
_DONE = "extracted.json"  # written last into the tasks folder: its presence marks a complete extraction


def ensure_sdist(folder: str | os.PathLike, *, expected_sha256: str | None = SDIST_SHA256) -> dict:
    """Return `{"path", "sha256", "requirement"}` of the BIG-bench sdist in `folder`, downloading it when missing.

    The download runs `python -m pip download --no-deps bigbench==1.0.0` (PyPI only; nothing is installed) into a
    temporary folder beside the destination and is renamed into place once its sha256 matches `expected_sha256`.
    """
    folder = Path(folder)
    path = folder / SDIST_NAME
    record_path = folder / "sdist.json"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=folder))
        try:
            print(f"Downloading {SDIST_REQUIREMENT} (358 MB sdist, never installed) into {folder} ...", flush=True)
            command = [sys.executable, "-m", "pip", "download", "--no-deps"]
            command += ["--disable-pip-version-check", SDIST_REQUIREMENT, "-d", str(staging)]
            result = subprocess.run(command, check=False)
            downloaded = staging / SDIST_NAME
            if result.returncode != 0 or not downloaded.is_file():
                raise MissingFileError(
                    f"`{' '.join(command)}` failed (exit {result.returncode}), so the BIG-bench tasks are not "
                    f"available. Check that PyPI can be reached, or put {SDIST_NAME} into {folder} yourself."
                )
            _check_sha256(downloaded, expected_sha256)
            os.replace(downloaded, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    record = read_json(record_path) if record_path.is_file() else {}
    if record.get("size") != path.stat().st_size or record.get("mtime") != path.stat().st_mtime:
        digest = _check_sha256(path, expected_sha256)
        record = {
            "requirement": SDIST_REQUIREMENT,
            "file": SDIST_NAME,
            "sha256": digest,
            "size": path.stat().st_size,
            "mtime": path.stat().st_mtime,
        }
        write_json(record, record_path)
    return {"path": str(path), "sha256": record["sha256"], "requirement": SDIST_REQUIREMENT}


def _check_sha256(path: Path, expected: str | None) -> str:
    digest = sha256_file(path)
    if expected is not None and digest != expected:
        raise CorruptFileError(
            f"{path} has sha256 {digest}, but {SDIST_REQUIREMENT}'s sdist on PyPI has {expected}: the download is "
            f"damaged or is another file. Delete {path} and run again to download it afresh."
        )
    return digest


def extract_task_files(sdist: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Extract every `bigbench/benchmark_tasks/**/task.json` of the sdist into `destination` (one pass, with a bar).

    Files land at `destination/<task path>/task.json`, e.g. `arithmetic/2_digit_addition/task.json`. Nothing else
    is extracted (no code is ever unpacked), and member names are checked to stay inside `destination`.
    """
    destination = Path(destination)
    if (destination / _DONE).is_file():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    try:
        count = 0
        total = os.path.getsize(sdist)
        with (
            open(sdist, "rb") as raw,
            tqdm(total=total, unit="B", unit_scale=True, desc="Extracting task.json") as bar,
        ):
            with tarfile.open(fileobj=_ProgressReader(raw, bar), mode="r|gz") as archive:
                for member in archive:
                    name = member.name
                    if not (member.isfile() and name.startswith(TASKS_PREFIX) and name.endswith("/task.json")):
                        continue
                    relative = Path(name[len(TASKS_PREFIX) :])
                    if relative.is_absolute() or ".." in relative.parts:
                        raise CorruptFileError(f"{sdist} holds a suspicious member name {name!r}; refusing it.")
                    target = staging / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = archive.extractfile(member)
                    target.write_bytes(source.read())
                    count += 1
        if count == 0:
            raise CorruptFileError(f"{sdist} holds no {TASKS_PREFIX}**/task.json file: it is not BIG-bench's sdist.")
        write_json({"sdist": str(sdist), "task_files": count}, staging / _DONE)
        if destination.exists():
            shutil.rmtree(destination)  # an incomplete earlier extraction (no marker)
        os.replace(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


class _ProgressReader:
    """A file wrapper that advances a tqdm bar by the compressed bytes read (tarfile streams through it)."""

    def __init__(self, raw, bar):
        self.raw, self.bar = raw, bar

    def read(self, size=-1):
        data = self.raw.read(size)
        self.bar.update(len(data))
        return data


def load_task_files(tasks_dir: str | os.PathLike) -> dict[str, dict]:
    """`{task path: parsed task.json}` for every extracted file, e.g. `{"arithmetic/2_digit_addition": {...}}`."""
    tasks_dir = Path(tasks_dir)
    if not tasks_dir.is_dir():
        raise MissingFileError(f"{tasks_dir} does not exist; call ensure_task_files first.")
    tasks = {}
    for path in sorted(tasks_dir.rglob("task.json")):
        name = path.parent.relative_to(tasks_dir).as_posix()
        try:
            tasks[name] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CorruptFileError(
                f"{path} is not valid JSON ({error}); delete {tasks_dir} to extract again."
            ) from error
    return tasks


def ensure_task_files(cache_dir: str | os.PathLike) -> tuple[Path, dict]:
    """Download (if needed) and extract BIG-bench's task files under `cache_dir/bigbench`; return (folder, sdist)."""
    folder = Path(cache_dir) / "bigbench"
    sdist = ensure_sdist(folder)
    return extract_task_files(sdist["path"], folder / "tasks"), sdist
