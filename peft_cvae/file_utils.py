"""Safe reading and atomic writing of the files peft-cvae produces.

Writes go to a temporary path next to the destination (`.<name>.tmp-*`) and are renamed into place only once every
file is complete, so an exception (or a crash) in the middle of a save leaves the previous version untouched; a failure
while moving a folder's files into place puts back the files already moved.
Reads accept only safetensors and JSON: nothing is ever unpickled.

Every save of a folder and every load of one holds `folder_lock(folder)`, an inter-process file lock (filelock, a
huggingface_hub dependency), so two processes saving into one folder, or one saving while another loads, never mix
files of two versions.
"""

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save, save_file

from .errors import CorruptFileError, MissingFileError, NotWritableError

__all__ = [
    "atomic_directory",
    "folder_lock",
    "parse_json",
    "parse_safetensors",
    "read_json",
    "read_safetensors",
    "sha256_bytes",
    "sha256_file",
    "write_json",
    "write_safetensors",
]


@contextlib.contextmanager
def atomic_directory(destination: str | os.PathLike):
    """Yield a temporary folder to write into; on success its files replace those of `destination`.

    Files already in `destination` that the writer does not produce are left alone, so saving into a folder that
    holds other files (a README, another adapter) does not delete them. If the writer raises, or moving a file into
    place fails, every file already moved is put back as it was (the previous version is hard-linked aside first) and
    folders this call created are removed: the destination is left exactly as it was found.
    """
    destination = Path(destination)
    _check_writable_destination(destination)
    with folder_lock(destination):
        created = _first_missing_ancestor(destination)  # the folder this call will create, if any
        staging = _make_staging(destination)
        try:
            yield staging
            _move_into_place(staging, destination)
        except BaseException as error:
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            if _is_disk_full(error):
                raise _disk_full(destination, error) from error
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


_LOCKS: dict[str, FileLock] = {}  # one lock object per folder and process, so nested holds are re-entrant


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, timeout: float = 600):
    """Hold the inter-process lock of a saved folder (a generator, bank or adapter) while it is written or read.

    The lock file lives in the system's temporary folder (`peft-cvae-locks/<hash of the folder's path>.lock`), not
    in or beside the folder: that works for read-only folders (the Hugging Face cache) and leaves the user's folders
    as they were. Where no lock file can be created, the folder is used without one.
    """
    lock = _lock_of(Path(folder), timeout)
    acquired = False
    if lock is not None:
        try:
            lock.acquire()
            acquired = True
        except Timeout as error:
            raise NotWritableError(
                f"{folder} has been locked by another process for {timeout:.0f} s (a save or load still running, or "
                f"a stale lock {lock.lock_file}). Wait for it to finish, or remove that lock "
                "file if no process holds it."
            ) from error
        except OSError:  # the lock file cannot be created or opened (a read-only or foreign temporary folder)
            pass
    try:
        yield
    finally:
        if acquired:
            lock.release()


def _lock_of(folder: Path, timeout: float = 600) -> FileLock | None:
    key = hashlib.sha256(os.fsencode(folder.resolve())).hexdigest()[:32]
    if key not in _LOCKS:
        directory = Path(tempfile.gettempdir()) / "peft-cvae-locks"
        try:
            directory.mkdir(exist_ok=True)
            if directory.stat().st_uid == os.getuid():
                directory.chmod(0o1777)  # shared by every user, like /tmp itself
        except OSError:
            return None
        _LOCKS[key] = FileLock(directory / f"{key}.lock", mode=0o666, timeout=timeout)
    return _LOCKS[key]


def _make_staging(destination: Path) -> Path:
    """A new hidden folder on the destination's file system (so files move with a rename): beside the destination,
    or inside it when that fails (a read-only parent of a writable folder) or when the destination is a mount point."""
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _not_writable(destination, error) from error
    parents = [destination.parent]
    if destination.is_dir():
        parents.insert(0 if os.path.ismount(destination) else 1, destination)
    for parent in parents:
        try:
            return Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=parent))
        except OSError as error:
            failure = error
    raise _not_writable(destination, failure) from failure


def _first_missing_ancestor(path: Path) -> Path | None:
    """The highest folder on the way to `path` (itself included) that does not exist yet, or None."""
    missing = None
    for candidate in [path, *path.parents]:
        if candidate.exists():
            break
        missing = candidate
    return missing


def _check_writable_destination(destination: Path) -> None:
    """Refuse, before anything is written, a destination that is a file or lies below one."""
    for candidate in [destination, *destination.parents]:
        if candidate.exists():
            if not candidate.is_dir():
                where = "is" if candidate == destination else f"lies inside {candidate}, which is"
                raise NotWritableError(
                    f"Cannot save into {destination}: it {where} a file, but a folder was expected. Choose an output "
                    "folder that does not exist yet or is a folder you can write to."
                )
            return


def _is_disk_full(error: BaseException) -> bool:
    """Whether a write failed for lack of space (an OSError, or safetensors' own error wrapping one)."""
    if isinstance(error, NotWritableError):
        return False
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(error, (OSError, SafetensorError)) and "No space left" in str(error)


def _disk_full(destination: Path, error: BaseException) -> NotWritableError:
    folder = next((path for path in [destination, *destination.parents] if path.exists()), Path("/"))
    free = shutil.disk_usage(folder).free
    return NotWritableError(
        f"Cannot write {destination}: the disk is full ({free / 2**20:.1f} MiB free on {folder}; {error}). Nothing "
        "was changed there. Free some space, or save to a folder on another disk."
    )


def _not_writable(destination: Path, error: OSError) -> NotWritableError:
    return NotWritableError(
        f"Cannot write to {destination}: {error.strerror or error}. Expected a folder that can be created and "
        "written; choose a folder you have write access to, or fix its permissions."
    )


def _move_into_place(staging: Path, destination: Path) -> None:
    """Move every file of `staging` into `destination`, rolling back all moves if one fails."""
    files = sorted(path for path in staging.rglob("*") if not path.is_dir())
    backup = staging / ".previous"  # hard links to the files being replaced, same file system as the destination
    probe = staging / ".mode-probe"
    open(probe, "xb").close()
    mode = probe.stat().st_mode & 0o777  # what the umask gives a new file; safetensors writes 0600
    moved: list[tuple[Path, Path | None]] = []  # (target, its previous version or None if it is new)
    try:
        destination.mkdir(exist_ok=True)
        for source in files:
            relative = source.relative_to(staging)
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            previous = None
            if target.is_file():
                previous = backup / relative
                previous.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(target, previous)
                except OSError:  # a file system without hard links
                    shutil.copy2(target, previous)
            os.chmod(source, mode)
            os.replace(source, target)
            moved.append((target, previous))
    except BaseException:
        for target, previous in reversed(moved):
            with contextlib.suppress(OSError):
                if previous is None:
                    target.unlink()
                else:
                    os.replace(previous, target)
        raise


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike):
    """Yield a temporary path next to `path`; once the writer returns, it replaces `path` in one rename."""
    path = Path(path)
    if path.is_dir():
        raise NotWritableError(f"Cannot write the file {path}: a folder of that name exists. Choose another path.")
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        open(temporary, "xb").close()
        mode = temporary.stat().st_mode & 0o777  # what the umask gives a new file (mkstemp and safetensors use 0600)
    except OSError as error:
        raise _not_writable(path.parent, error) from error
    try:
        yield temporary
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except (OSError, SafetensorError) as error:
        if _is_disk_full(error):
            raise _disk_full(path, error) from error
        raise
    finally:
        temporary.unlink(missing_ok=True)


def write_json(data, path: str | os.PathLike) -> None:
    """Write `data` as indented JSON (sorted keys, trailing newline), atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"  # fails on non-JSON data before anything is written
    with _atomic_file(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)


def read_json(path: str | os.PathLike, *, what: str = "JSON file") -> dict:
    """Read a JSON object, turning a missing or unparsable file into a clear peft-cvae error."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"The {what} {path} does not exist. Check the path, or save the folder again.")
    return parse_json(path.read_bytes(), path, what=what)


def parse_json(data: bytes, path: str | os.PathLike, *, what: str = "JSON file") -> dict:
    """Parse the bytes of a JSON object read from `path` (named in errors), with `read_json`'s errors."""
    try:
        data = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptFileError(
            f"The {what} {path} is not valid JSON ({error}). The file is corrupted or truncated: download or save "
            "it again."
        ) from error
    if not isinstance(data, dict):
        raise CorruptFileError(
            f"The {what} {path} holds a JSON {type(data).__name__}, expected an object. The file is corrupted or "
            "not what it should be: download or save it again."
        )
    return data


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    """Save tensors as safetensors (contiguous copies, `format: pt` metadata as transformers and peft write it),
    atomically."""
    tensors = {key: value.detach().contiguous() for key, value in tensors.items()}
    with _atomic_file(path) as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt", **(metadata or {})})


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata=None) -> bytes:
    """The bytes `write_safetensors` writes for these tensors (so their sha256 is the saved file's)."""
    tensors = {key: value.detach().contiguous() for key, value in tensors.items()}
    return save(tensors, metadata={"format": "pt", **(metadata or {})})


def read_safetensors(path: str | os.PathLike, *, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a missing, truncated or corrupted file into a clear peft-cvae error."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"The {what} {path} does not exist. Check the path, or save the folder again.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CorruptFileError(
            f"The {what} {path} is not a readable safetensors file ({error}). It is corrupted or truncated: "
            "download or save it again."
        ) from error


def parse_safetensors(
    data: bytes, path: str | os.PathLike, *, what: str = "weights file", advice: str | None = None
) -> dict[str, torch.Tensor]:
    """Load tensors from the bytes of a safetensors file read from `path` (named in errors), with
    `read_safetensors`'s errors; `advice` replaces the default "It is corrupted or truncated: ..." sentence."""
    try:
        return load(data)
    except (SafetensorError, OSError, ValueError) as error:
        advice = advice or "It is corrupted or truncated: download or save it again."
        raise CorruptFileError(f"The {what} {path} is not a readable safetensors file ({error}). {advice}") from error


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of bytes already read: hash what is then parsed, so the check and the load see the same bytes."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes. safetensors has no checksum of its own, so a flipped bit in tensor data would
    load as a plausible number; manifests record this hash to catch that."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
