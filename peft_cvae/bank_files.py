"""`CheckpointFiles`: the checkpoint files of a bank on disk, read one at a time and memory-mapped, never all at once;
`LoraCheckpoint`: one checkpoint of a bank, its state dict in memory or read from such a file when asked for.

A bank of 7-8B LoRAs is tens of GB to TB; `LoraBank.from_pretrained` keeps only the manifest in memory and reads a
checkpoint when it is asked for (`LoraBank.vector(i)`, `iter_vectors`, `checkpoint.state_dict`), through here:

* At open (`check_header`, cheap: the header only): the file parses as safetensors and its dtype, keys and shapes fit
  the bank's layout. A file whose header fails and whose hash is recorded is hashed first, so damage is reported as
  damage (the sha256 differs), not as a puzzling format error.
* On the first read of each file (`read`): its sha256 is checked against the bank's integrity record (banks saved
  before it: the manifest's per-file sha256), hashing the file in 1 MB blocks (`VerifiedFolder.check_file`: the hash
  the record holds, computed once, never a second one), and its values are checked to be finite. The tensors are
  then read through `safetensors.safe_open` (memory-mapped: only the bytes of this checkpoint are touched).
* Later reads skip the hash while the file is the same file: its (device, inode, size, mtime) identity, recorded when
  it was checked, is compared before and after every read. A file replaced or edited since (an atomic save makes a
  new inode; a write in place changes the mtime) is hashed again, and a file that changed during a read is refused,
  so a damaged checkpoint met mid-epoch raises `CorruptFileError` naming the file.

Unlike `VerifiedFolder.read_bytes`, the hash and the parse do not see one buffer (that would hold the file in memory
twice); the identity check before and after the read stands in for it.
"""

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import CorruptFileError, LayoutMismatchError
from .file_utils import safetensors_bytes, sha256_bytes, sha256_file
from .integrity import VerifiedFolder
from .layout import LoraLayout

__all__ = ["CheckpointFiles", "LoraCheckpoint"]

WHAT = "bank checkpoint"
# safetensors' dtype names -> torch's, for the dtypes a layout may have
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _identity(path: Path) -> tuple[int, int, int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


class CheckpointFiles:
    """Reads the checkpoint files of one bank folder, checking each as the module docstring says.

    Args:
        files: the bank folder with its integrity record (`VerifiedFolder`).
        layout: the bank's layout; every checkpoint must have its keys, shapes and dtype.
    """

    def __init__(self, files: VerifiedFolder, layout: LoraLayout):
        self.files = files
        self.layout = layout
        self._checked: dict[str, tuple[int, int, int, int]] = {}  # file -> identity when its hash was checked

    def path(self, name: str) -> Path:
        return self.files.folder / name

    def check_header(self, name: str, expected_sha256: str | None) -> None:
        """Check, from the header alone, that `name` is a safetensors file of the layout's dtype, keys and shapes."""
        path = self.path(name)
        try:
            with safe_open(str(path), framework="pt") as file:
                header = {
                    key: (file.get_slice(key).get_dtype(), file.get_slice(key).get_shape()) for key in file.keys()
                }
        except (SafetensorError, OSError, ValueError) as error:
            self.files.check_file(name, what=WHAT, expected_sha256=expected_sha256)  # damaged: say so
            raise CorruptFileError(
                f"The {WHAT} {path} is not a readable safetensors file ({error}). It is corrupted or truncated: "
                "download or save it again."
            ) from error
        dtypes = sorted({_SAFETENSORS_DTYPES.get(dtype, dtype.lower()) for dtype, _ in header.values()})
        if dtypes and dtypes != [self.layout.dtype]:
            raise CorruptFileError(
                f"The {WHAT} {path} holds tensors of dtype {dtypes} but the bank's layout says {self.layout.dtype}. "
                "The file is corrupted or from another bank: save the bank again."
            )
        # the layout's own check names the first missing, unexpected or reshaped key (meta tensors: no data read)
        self.layout.check({key: torch.empty(shape, device="meta") for key, (_, shape) in header.items()})

    def read(self, name: str, expected_sha256: str | None) -> dict[str, torch.Tensor]:
        """The state dict in `name`, checked (hash and finiteness) on its first read and whenever the file changed."""
        path = self.path(name)
        before = _identity(path)
        first = self._checked.get(name) != before
        if first:
            self.files.check_file(name, what=WHAT, expected_sha256=expected_sha256)
        try:
            with safe_open(str(path), framework="pt") as file:
                state_dict = {key: file.get_tensor(key) for key in file.keys()}
        except (SafetensorError, OSError, ValueError) as error:
            raise CorruptFileError(
                f"The {WHAT} {path} is not a readable safetensors file ({error}). It is corrupted or truncated: "
                "download or save it again."
            ) from error
        if _identity(path) != before:
            raise CorruptFileError(
                f"The {WHAT} {path} changed while it was being read (another process is writing the bank?). Do not "
                "write a bank while it is read; load it again once the write is done."
            )
        try:
            self.layout.check(state_dict)
        except LayoutMismatchError as error:  # the header was checked at open: the file was replaced since
            raise CorruptFileError(f"The {WHAT} {path} no longer fits the bank's layout: {error}") from error
        if first:
            self.layout.check_finite(state_dict)
            self._checked[name] = before
        return state_dict


class LoraCheckpoint:
    """One LoRA checkpoint of a task: its PEFT state dict and the training step it was taken at (if known).

    A checkpoint added with `LoraBank.add_checkpoint` holds its state dict in memory. One of a bank loaded with
    `LoraBank.from_pretrained` holds only where its file is: `state_dict` reads the file on each access (memory-mapped,
    its hash checked on the first read, see `peft_cvae.bank_files`) and keeps nothing, so a bank larger than memory
    can be walked checkpoint by checkpoint.
    """

    def __init__(
        self,
        task: str,
        state_dict: dict[str, torch.Tensor] | None = None,
        step: int | None = None,
        *,
        file: str | None = None,
        files: CheckpointFiles | None = None,
        sha256: str | None = None,
    ):
        if (state_dict is None) == (files is None):
            raise TypeError("A LoraCheckpoint needs either a state_dict or the bank files it is read from.")
        self.task = task
        self.step = step
        self.file = file  # path inside the bank folder, for checkpoints read from disk
        self._state_dict = state_dict
        self._files = files
        self._manifest_sha256 = sha256  # the hash a bank manifest recorded (banks saved before the integrity record)
        self._sha256 = None

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self._files is None:
            return self._state_dict
        return self._files.read(self.file, self._manifest_sha256)

    @property
    def on_disk(self) -> bool:
        return self._files is not None

    @property
    def sha256(self) -> str:
        """The sha256 of this checkpoint's safetensors file: the one recorded when the bank was saved, or, for a
        checkpoint in memory, that of the file `save_pretrained` would write (the same bytes). Identifies the data
        without reading it for a bank on disk."""
        if self._sha256 is None:
            if self._files is None:
                self._sha256 = sha256_bytes(safetensors_bytes(self._state_dict))
            elif self._files.files.record is not None:
                self._sha256 = self._files.files.record[self.file]
            else:  # the manifest's hash, or for a bank older than every recorded hash, the file's
                self._sha256 = self._manifest_sha256 or sha256_file(self._files.path(self.file))
        return self._sha256

    def __repr__(self) -> str:
        where = f"file={self.file!r}" if self.on_disk else "in memory"
        return f"LoraCheckpoint(task={self.task!r}, step={self.step!r}, {where})"
