"""Safe reading and atomic writing of the files peft-cvae produces.

Writes go to a temporary folder next to the destination and are moved into place only once every file is complete, so
an exception (or a crash) in the middle of a save leaves the previous version of each file untouched.
Reads accept only safetensors and JSON: nothing is ever unpickled.
"""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CorruptFileError, MissingFileError

__all__ = ["atomic_directory", "read_json", "read_safetensors", "write_json", "write_safetensors"]


@contextlib.contextmanager
def atomic_directory(destination: str | os.PathLike):
    """Yield a temporary folder to write into; on success its files replace those of `destination`.

    Files already in `destination` that the writer does not produce are left alone, so saving into a folder that
    holds other files (a README, another adapter) does not delete them.
    """
    destination = Path(destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    except OSError as error:
        raise OSError(
            f"Cannot write to {destination}: {error.strerror or error}. Choose a folder you have write access to."
        ) from error
    try:
        yield staging
        destination.mkdir(exist_ok=True)
        for source in sorted(staging.rglob("*")):
            if source.is_dir():
                continue
            target = destination / source.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(data, path: str | os.PathLike) -> None:
    """Write `data` as indented JSON (sorted keys, trailing newline)."""
    with open(path, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=2, sort_keys=True)
        file.write("\n")


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
        raise CorruptFileError(f"The {what} {path} holds a JSON {type(data).__name__}, expected an object.")
    return data


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    """Save tensors as safetensors (contiguous copies, `format: pt` metadata as transformers and peft write it)."""
    tensors = {key: value.detach().contiguous() for key, value in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})


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
