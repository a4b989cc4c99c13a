"""The errors peft-cvae raises for user mistakes and bad files.

Every error says what was found, what was expected and what to do about it. Each class also subclasses the built-in
exception that fits (`ValueError` for bad values, `OSError` for files), so callers that already catch those keep
working.
"""

__all__ = [
    "ConditionError",
    "CorruptFileError",
    "EmptyBankError",
    "InvalidArgumentError",
    "InvalidConfigError",
    "LayoutMismatchError",
    "MissingExtraError",
    "MissingFileError",
    "NonFiniteError",
    "NotWritableError",
    "PeftCVAEError",
    "UnknownTaskError",
    "UnsupportedAdapterError",
]


class PeftCVAEError(Exception):
    """Base class of every error peft-cvae raises on purpose."""


class LayoutMismatchError(PeftCVAEError, ValueError):
    """An adapter's keys or shapes differ from the layout (another base model, rank or set of target modules)."""


class UnsupportedAdapterError(PeftCVAEError, ValueError):
    """The adapter is a PEFT type or LoRA variant that peft-cvae cannot flatten (e.g. DoRA, IA3)."""


class ConditionError(PeftCVAEError, ValueError):
    """A task condition has the wrong size, dtype or values."""


class UnknownTaskError(PeftCVAEError, ValueError):
    """A task was named that the generator or bank does not know."""


class EmptyBankError(PeftCVAEError, ValueError):
    """A bank has too few checkpoints or tasks for what was asked of it."""


class InvalidConfigError(PeftCVAEError, ValueError):
    """A generator config has a missing, out-of-range or wrongly typed field."""


class NonFiniteError(PeftCVAEError, ValueError):
    """A tensor holds NaN or Inf where only finite values make sense."""


class CorruptFileError(PeftCVAEError, OSError):
    """A file exists but cannot be parsed: truncated or corrupted safetensors, invalid JSON, wrong fields."""


class MissingFileError(PeftCVAEError, FileNotFoundError):
    """A file that a folder needs is not there."""


class NotWritableError(PeftCVAEError, OSError):
    """An output folder cannot be created or written (no permission, read-only disk, a file in the way)."""


class InvalidArgumentError(PeftCVAEError, ValueError, TypeError):
    """An argument has the wrong type or an out-of-range value (e.g. `num_samples=0`, `temperature=-1`, a str seed).

    Also a `TypeError`, so code that caught the raw `TypeError` of a wrongly typed argument keeps working."""


class MissingExtraError(PeftCVAEError, ImportError):
    """An optional dependency of peft-cvae (one of its extras) is not installed; the message names the extra."""


class DemoError(PeftCVAEError, ValueError):
    """A demo request that cannot be served as asked: no base model to compare with, an empty prompt or repo id."""
