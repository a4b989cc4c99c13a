"""Safe reading and atomic writing of the files peft-cvae produces.

Writes go to a temporary path next to the destination (`.<name>.tmp-*`) and are renamed into place only once every
file is complete, so an exception (or a crash) in the middle of a save leaves the previous version untouched; a failure
while moving a folder's files into place puts back the files already moved.
Reads accept only safetensors and JSON: nothing is ever unpickled.
"""

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CorruptFileError, MissingFileError, NotWritableError

__all__ = [
    "atomic_directory",
    "check_data_sha256",
    "read_json",
    "read_safetensors",
    "sha256_file",
    "stamp_data_sha256",
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
    created = _first_missing_ancestor(destination)  # the folder this call will create, if any
    staging = _make_staging(destination)
    try:
        yield staging
        _move_into_place(staging, destination)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
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


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes. safetensors has no checksum of its own, so a flipped bit in tensor data would
    load as a plausible number; manifests record this hash to catch that."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# safetensors stores no checksum, so a flipped bit in tensor data loads as a plausible number. Files peft-cvae writes
# through transformers (a generator's model.safetensors) carry the SHA-256 of their data section in their metadata.
DATA_SHA256_KEY = "peft_cvae_data_sha256"


def _safetensors_data_offset(path: Path) -> tuple[dict, int] | None:
    """(metadata, offset of the data section) of a safetensors file, or None if its header does not parse (the
    safetensors loader then reports that, with its own error)."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            return None
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            return None
        try:
            header = json.loads(file.read(length))
        except (ValueError, UnicodeDecodeError):
            return None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        return None
    return header.get("__metadata__", {}), 8 + length


def _sha256_from(path: Path, offset: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        file.seek(offset)
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stamp_data_sha256(path: str | os.PathLike) -> None:
    """Rewrite a safetensors file (same tensors, same data bytes) with the SHA-256 of its data in its metadata."""
    path = Path(path)
    tensors = load_file(str(path))
    metadata, offset = _safetensors_data_offset(path)
    digest = _sha256_from(path, offset)
    for _ in range(2):  # the data section does not depend on the metadata; the second pass only guards that
        write_safetensors(tensors, path, metadata={**metadata, DATA_SHA256_KEY: digest})
        _, offset = _safetensors_data_offset(path)
        written = _sha256_from(path, offset)
        if written == digest:
            return
        digest = written
    raise RuntimeError(f"The data of {path} changed between two identical writes; it was not stamped.")


def check_data_sha256(path: str | os.PathLike, *, what: str = "weights file") -> None:
    """Raise `CorruptFileError` if a safetensors file stamped by `stamp_data_sha256` no longer matches its hash.
    Unstamped files (written by other tools) and unparsable headers pass: the loader reports the latter."""
    path = Path(path)
    parsed = _safetensors_data_offset(path)
    if parsed is None or not parsed[0].get(DATA_SHA256_KEY):
        return
    metadata, offset = parsed
    found = _sha256_from(path, offset)
    if found != metadata[DATA_SHA256_KEY]:
        raise CorruptFileError(
            f"The {what} {path} has tensor data with sha256 {found[:12]}..., but the file recorded "
            f"{str(metadata[DATA_SHA256_KEY])[:12]}... when it was saved: it changed or was damaged since. Save or "
            "download it again."
        )
