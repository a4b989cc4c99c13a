"""Reading LoRA adapters from disk or the Hub: PEFT adapter folders (`adapter_config.json` +
`adapter_model.safetensors`) and diffusers LoRA folders (`pytorch_lora_weights.safetensors`), and the checks of the
LoRA config they carry.

Everything returns PEFT's saved form: the config as a plain dict (`lora_config_to_dict`) and the state dict with keys
`base_model.model.<module>.lora_A.weight`, ... . A local PEFT folder is read through `VerifiedFolder`: each file once,
checked against the folder's integrity record when peft-cvae wrote it (see `peft_cvae.integrity`); a Hub repo id is
read by peft itself. `LoraLayout` (pure maths over keys and shapes) builds on what this module reads.
"""

import json
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig
from peft.utils import load_peft_weights

from .constants import ADAPTER_BIN_WEIGHTS_NAME, ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME
from .diffusers_lora_files import load_diffusers_lora
from .errors import CorruptFileError, MissingFileError, UnsupportedAdapterError
from .file_utils import folder_lock
from .integrity import VerifiedFolder

__all__ = ["adapter_library", "check_supported", "load_adapter", "load_diffusers_lora", "lora_config_to_dict"]


def lora_config_to_dict(config: LoraConfig | dict) -> dict:
    """A JSON-serialisable copy of a LoRA config: sets become sorted lists, enums their values."""
    if isinstance(config, PeftConfig):
        config = config.to_dict()

    def plain(value):
        if isinstance(value, (set, frozenset)):
            return sorted(plain(item) for item in value)
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {str(key): plain(item) for key, item in value.items()}
        if hasattr(value, "value") and isinstance(value.value, str):  # PeftType / TaskType enums
            return value.value
        return value

    data = plain(dict(config))
    json.dumps(data)  # fail here, not at save time, if a field is still not JSON
    return data


def check_supported(config: dict) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"peft-cvae generates LoRA adapters, but this adapter has peft_type={peft_type!r}. "
            "Train LoRA adapters (peft.LoraConfig) for the bank."
        )
    if config.get("use_dora"):
        raise UnsupportedAdapterError(
            "DoRA adapters (use_dora=True) are not supported yet: their magnitude vectors need a different "
            "normalisation. Train the bank's adapters with use_dora=False."
        )


def lora_field_problem(config: dict) -> str | None:
    """What is wrong with the fields of a LoRA config read from a file (None if nothing): peft itself accepts e.g. a
    string rank, and the error would only surface much later."""
    rank, alpha, targets = config.get("r"), config.get("lora_alpha"), config.get("target_modules")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        return f"r={rank!r} (expected a positive integer)"
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return f"lora_alpha={alpha!r} (expected a number)"
    if targets is not None and not isinstance(targets, str):
        if not isinstance(targets, list) or not all(isinstance(name, str) for name in targets):
            return f"target_modules={targets!r} (expected a module name, a regex or a list of names)"
    return None


def adapter_library(path: str | os.PathLike) -> str:
    """`"diffusers"` for a local folder holding diffusers' `pytorch_lora_weights.safetensors` or a local
    `.safetensors` LoRA file (diffusers or Kohya format: a UNet LoRA), else `"peft"`. Used to give a bank built from
    adapter folders the right `LoraLayout.library`."""
    path = Path(str(path))
    if path.is_file() and path.suffix == ".safetensors":
        return "diffusers"
    return "diffusers" if (path / DIFFUSERS_WEIGHTS_NAME).is_file() else "peft"


def _checked_config(config_dict: dict, path_str: str) -> dict:
    check_supported(config_dict)
    problem = lora_field_problem(config_dict)
    if problem is not None:
        raise CorruptFileError(
            f"The {ADAPTER_CONFIG_NAME} of {path_str} has {problem}. Save the adapter again with "
            "`PeftModel.save_pretrained`."
        )
    return config_dict


def _load_local_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A local PEFT adapter folder, each file read once and checked against its integrity record (if any)."""
    if not (folder / ADAPTER_CONFIG_NAME).is_file():
        raise MissingFileError(
            f"{folder} has no {ADAPTER_CONFIG_NAME}, so it is not a PEFT adapter folder. Point to the folder "
            "written by `PeftModel.save_pretrained`."
        )
    with folder_lock(folder):
        files = VerifiedFolder(folder, what="adapter")
        data = files.read_json(ADAPTER_CONFIG_NAME, what="adapter config")
        try:
            data.pop("runtime_config", None)  # as PeftConfig.from_pretrained: runtime settings are not saved state
            config_dict = lora_config_to_dict(PeftConfig.from_peft_type(**PeftConfig.check_kwargs(**data)))
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise CorruptFileError(
                f"The {ADAPTER_CONFIG_NAME} of {folder} cannot be read as a PEFT config: {error}. Expected the JSON "
                "that `PeftModel.save_pretrained` writes; save the adapter again."
            ) from error
        config_dict = _checked_config(config_dict, str(folder))
        if files.exists(ADAPTER_WEIGHTS_NAME):
            state_dict = files.read_safetensors(
                ADAPTER_WEIGHTS_NAME,
                what="adapter weights",
                advice="The file is corrupted or truncated: save or download it again.",
            )
        elif files.exists(ADAPTER_BIN_WEIGHTS_NAME):
            state_dict = _load_legacy_bin(folder)
        else:
            raise MissingFileError(
                f"{folder} has an {ADAPTER_CONFIG_NAME} but no adapter weights (expected {ADAPTER_WEIGHTS_NAME}). "
                "Save the adapter again with `PeftModel.save_pretrained`."
            )
    return config_dict, state_dict


def _load_legacy_bin(folder: Path) -> dict[str, torch.Tensor]:
    """A legacy `adapter_model.bin`, read by peft with `torch.load(weights_only=True)`: tensors only, no code."""
    try:
        return load_peft_weights(str(folder), device="cpu")
    except Exception as error:
        if type(error).__name__ == "UnpicklingError":  # torch.load(weights_only=True) met something not a tensor
            raise CorruptFileError(
                f"The legacy {ADAPTER_BIN_WEIGHTS_NAME} in {folder} was refused: it holds objects other than "
                "tensors, which could run code when unpickled. Expected a plain state dict; ask for the adapter as "
                f"{ADAPTER_WEIGHTS_NAME}, and do not load this file with weights_only=False elsewhere either."
            ) from error
        raise


def load_adapter(path: str | os.PathLike, unet_config=None, **hub_kwargs) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a PEFT adapter (local folder or Hub repo id): its config as a dict and its state dict.

    A local folder is read file by file through `VerifiedFolder` (`adapter_model.safetensors`, or a legacy `.bin`
    with `torch.load(weights_only=True)`); a Hub repo id by peft. A local diffusers LoRA folder (only
    `pytorch_lora_weights.safetensors`) or a local `.safetensors` LoRA file (diffusers or Kohya/A1111 format) is read
    by diffusers' converters and returned in PEFT's saved form (see `peft_cvae.diffusers_lora_files`; `unet_config`
    is needed there only for Kohya SDXL files with original block names).
    """
    path_str = str(path)
    if Path(path_str).exists():
        folder = Path(path_str)
        if folder.is_file() or (
            not (folder / ADAPTER_CONFIG_NAME).is_file() and adapter_library(folder) == "diffusers"
        ):
            return load_diffusers_lora(folder, unet_config=unet_config)
        return _load_local_adapter(folder)
    looks_local = isinstance(path, os.PathLike) or os.path.isabs(path_str) or path_str.startswith(".")
    if looks_local or path_str.count("/") > 1:
        raise MissingFileError(
            f"The adapter folder {path_str} does not exist (and it is not a Hub repo id of the form 'owner/name'). "
            "Check the path."
        )
    config_dict = _checked_config(lora_config_to_dict(PeftConfig.from_pretrained(path_str, **hub_kwargs)), path_str)
    try:
        state_dict = load_peft_weights(path_str, device="cpu", **hub_kwargs)
    except FileNotFoundError as error:
        raise MissingFileError(
            f"{path_str} has an {ADAPTER_CONFIG_NAME} but no adapter weights ({ADAPTER_WEIGHTS_NAME}). "
            "Save the adapter again with `PeftModel.save_pretrained`."
        ) from error
    return config_dict, state_dict
