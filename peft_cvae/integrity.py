"""One integrity scheme for every folder peft-cvae saves: generators, banks and generated adapters.

safetensors and JSON carry no checksum, so a flipped bit in tensor data, or an edited `"lora_alpha"` in a config,
loads as something plausible and silently changes every adapter generated afterwards. So every save ends by writing
`peft_cvae_integrity.json` (written last, inside the same atomic save):

    {"format_version": 1, "algorithm": "sha256", "files": {"config.json": "<hex>", "model.safetensors": "<hex>"}}

listing every file of the save that changes what is loaded: weights, configs and manifests alike (the card,
README.md, is left out: it changes nothing that is loaded). Loading goes through `VerifiedFolder`, which reads each
file ONCE, hashes those bytes and parses the same bytes, so a file replaced between a check and a load cannot slip
through; a file the record lists but the folder lacks is a `MissingFileError` at once, not a later puzzle.

Folders saved before this scheme (peft-cvae <= c9feab9) have no record; they still load, and what they recorded is
still checked: a bank manifest's per-file `sha256` entries (`expected_sha256=`) and the data hash a generator's or
adapter's `model.safetensors` carried in its safetensors metadata (`_legacy_data_sha256_problem`).
"""

import json
import os
import re
from pathlib import Path

import torch

from .constants import CARD_NAME, INTEGRITY_FORMAT_VERSION, INTEGRITY_NAME
from .errors import CorruptFileError, MissingFileError
from .file_utils import parse_json, parse_safetensors, sha256_bytes, sha256_file, write_json

__all__ = ["VerifiedFolder", "write_integrity_record"]

# The data hash files saved by peft-cvae <= c9feab9 carried in their safetensors metadata.
_LEGACY_DATA_SHA256_KEY = "peft_cvae_data_sha256"


def write_integrity_record(folder: str | os.PathLike) -> None:
    """Write the integrity record of every file in `folder` (a staging folder about to be moved into place), except
    the card and hidden files. Call it last, once every other file is written."""
    folder = Path(folder)
    files = sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    record = {
        "format_version": INTEGRITY_FORMAT_VERSION,
        "algorithm": "sha256",
        "files": {name: sha256_file(folder / name) for name in files if name not in (INTEGRITY_NAME, CARD_NAME)},
    }
    write_json(record, folder / INTEGRITY_NAME)


def _legacy_data_sha256_problem(data: bytes) -> tuple[str, str] | None:
    """(found, recorded) if a safetensors file stamped by peft-cvae <= c9feab9 no longer matches the data hash in its
    metadata, else None (unstamped, or a header that does not parse: the safetensors loader reports that)."""
    if len(data) < 8:
        return None
    length = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + length])
    except (ValueError, UnicodeDecodeError):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    recorded = metadata.get(_LEGACY_DATA_SHA256_KEY) if isinstance(metadata, dict) else None
    if not recorded:
        return None
    found = sha256_bytes(data[8 + length :])
    return None if found == recorded else (found, str(recorded))


class VerifiedFolder:
    """The files of a saved folder, each read once and checked against the folder's integrity record.

    Hold `folder_lock(folder)` around its use, so that no save replaces files between two reads.

    Args:
        folder: the generator, bank or adapter folder.
        what: what the folder is, for messages ("generator", "LoRA bank", "adapter").
    """

    def __init__(self, folder: str | os.PathLike, what: str):
        self.folder = Path(folder)
        self.what = what
        self.record: dict[str, str] | None = None
        record_path = self.folder / INTEGRITY_NAME
        if record_path.is_file():
            data = parse_json(record_path.read_bytes(), record_path, what=f"{what} integrity record")
            files = data.get("files")
            if (
                data.get("algorithm") != "sha256"
                or not isinstance(files, dict)
                or not all(isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) for value in files.values())
            ):
                raise CorruptFileError(
                    f"The {what} integrity record {record_path} is malformed (expected {{'algorithm': 'sha256', "
                    "'files': {name: 64 hex digits}}). Save or download the folder again."
                )
            if data.get("format_version", 1) > INTEGRITY_FORMAT_VERSION:
                raise CorruptFileError(
                    f"The {what} at {self.folder} was saved by a newer peft-cvae (integrity record format "
                    f"{data['format_version']}). Upgrade peft-cvae."
                )
            self.record = files
            missing = sorted(name for name in files if not (self.folder / name).is_file())
            if missing:
                raise MissingFileError(
                    f"The {what} at {self.folder} lacks {', '.join(missing)}, which its integrity record "
                    f"({INTEGRITY_NAME}) lists: the folder is incomplete. Copy, save or download all of it again."
                )

    def exists(self, name: str) -> bool:
        return (self.folder / name).is_file()

    def read_bytes(self, name: str, *, what: str, expected_sha256: str | None = None) -> bytes:
        """The bytes of `folder/name`, read once and checked against the integrity record (or, for a folder saved
        before the record existed, against `expected_sha256`, the hash a bank manifest recorded)."""
        path = self._existing(name, what)
        data = path.read_bytes()
        expected_sha256, source = self._expected(name, what, expected_sha256)
        if expected_sha256 is not None:
            self._compare(path, what, sha256_bytes(data), expected_sha256, source)
        return data

    def check_file(self, name: str, *, what: str, expected_sha256: str | None = None) -> bool:
        """Hash `folder/name` in blocks (memory: one block, whatever the file's size) and check it as `read_bytes`
        does, for a file that is then read memory-mapped rather than whole. False if no hash is known to check."""
        path = self._existing(name, what)
        expected_sha256, source = self._expected(name, what, expected_sha256)
        if expected_sha256 is None:
            return False
        self._compare(path, what, sha256_file(path), expected_sha256, source)
        return True

    def _existing(self, name: str, what: str) -> Path:
        path = self.folder / name
        if not path.is_file():
            raise MissingFileError(f"The {what} {path} does not exist. The folder is incomplete: save it again.")
        return path

    def _expected(self, name: str, what: str, expected_sha256: str | None) -> tuple[str | None, str]:
        """The hash `name` must have and where it was recorded."""
        if self.record is None:
            return expected_sha256, f"the {self.what} manifest"
        if name not in self.record:
            raise CorruptFileError(
                f"The {what} {self.folder / name} is not listed in the folder's integrity record ({INTEGRITY_NAME}): "
                "it was added after the folder was saved. Remove it, or save the folder again."
            )
        return self.record[name], f"the {self.what}'s integrity record"

    def _compare(self, path: Path, what: str, found: str, expected_sha256: str, source: str) -> None:
        if found != expected_sha256:
            raise CorruptFileError(
                f"The {what} {path} has sha256 {found[:12]}..., but {source} recorded {expected_sha256[:12]}... when "
                f"it was saved: the file changed or was damaged since. Save or download it again, or copy or download "
                f"the whole {self.what} again."
            )

    def read_json(self, name: str, *, what: str, expected_sha256: str | None = None) -> dict:
        path = self.folder / name
        return parse_json(self.read_bytes(name, what=what, expected_sha256=expected_sha256), path, what=what)

    def read_safetensors(
        self, name: str, *, what: str, expected_sha256: str | None = None, advice: str | None = None
    ) -> dict[str, torch.Tensor]:
        path = self.folder / name
        data = self.read_bytes(name, what=what, expected_sha256=expected_sha256)
        if self.record is None and expected_sha256 is None:
            problem = _legacy_data_sha256_problem(data)
            if problem is not None:
                raise CorruptFileError(
                    f"The {what} {path} has tensor data with sha256 {problem[0][:12]}..., but the file recorded "
                    f"{problem[1][:12]}... when it was saved: it changed or was damaged since. Save or download it "
                    "again."
                )
        return parse_safetensors(data, path, what=what, advice=advice)
