"""LoRAs on a diffusers UNet: read them into a bank, and write generated ones in the form diffusers loads.

A LoRA on a diffusers UNet is a PEFT LoRA like any other: diffusers' training scripts add it with
`unet.add_adapter(LoraConfig(...))` and `peft.get_peft_model(unet, config)` wraps the UNet the same way. The bank and
the generator therefore work on PEFT's saved key form (`base_model.model.<module>.lora_A.weight`), and the layout
records `library="diffusers"` so that a generated adapter is written twice:

    adapter_config.json + adapter_model.safetensors   PEFT, for `PeftModel.from_pretrained(unet, dir)`
    pytorch_lora_weights.safetensors                  diffusers, for `pipe.load_lora_weights(dir)`

The diffusers file is written by diffusers itself (`StableDiffusionPipeline.save_lora_weights`, keys converted with
`convert_state_dict_to_diffusers` as in diffusers' `train_text_to_image_lora.py`) and carries the LoRA config as
`lora_adapter_metadata`. Without that metadata diffusers assumes `lora_alpha = r` and silently rescales the adapter by
`r / lora_alpha`, so it is always written, and required when a diffusers file is read back.

diffusers is an optional dependency (`pip install "peft-cvae[diffusers]"`); it is imported only when needed.
"""

import os
import sys
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict

from .errors import CorruptFileError, MissingFileError, UnsupportedAdapterError

__all__ = [
    "DIFFUSERS_WEIGHTS_NAME",
    "get_diffusers_lora_state_dict",
    "is_diffusers_unet",
    "load_diffusers_lora",
    "save_diffusers_lora_weights",
]

# diffusers.loaders.lora_base.LORA_WEIGHT_NAME_SAFE: the file `load_lora_weights(dir)` looks for.
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# PEFT's saved keys for a `PeftModel` around the UNet start with this; diffusers' keys start with the component name.
PEFT_PREFIX = "base_model.model."
UNET_PREFIX = "unet"


def _import_diffusers():
    try:
        import diffusers
    except ImportError as error:
        raise ImportError(
            'LoRAs on diffusion models need diffusers: pip install "peft-cvae[diffusers]" (or pip install diffusers).'
        ) from error
    return diffusers


def is_diffusers_unet(model) -> bool:
    """Whether `model` is a diffusers `UNet2DConditionModel` (Stable Diffusion 1.x / 2.x / XL). Never imports
    diffusers: if it was not imported yet, `model` cannot be one of its classes."""
    diffusers = sys.modules.get("diffusers")
    return diffusers is not None and isinstance(model, diffusers.UNet2DConditionModel)


def get_diffusers_lora_state_dict(model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """PEFT saved-form state dict of a LoRA on a diffusers UNet.

    `model` is a `UNet2DConditionModel` with an adapter added by `unet.add_adapter(config)` (or `load_lora_weights`),
    or a `PeftModel` around one. Keys are `base_model.model.<module>.lora_A.weight`, ..., exactly what
    `PeftModel.save_pretrained` writes for `peft.get_peft_model(unet, config)`, so both routes give the same layout.
    """
    if isinstance(model, PeftModel):
        if not is_diffusers_unet(model.get_base_model()):
            raise UnsupportedAdapterError(
                f"The PeftModel wraps a {type(model.get_base_model()).__name__}, not a diffusers UNet2DConditionModel."
                " Use LoraLayout.from_peft_model for other models."
            )
        return get_peft_model_state_dict(model, adapter_name=adapter_name)
    if not is_diffusers_unet(model):
        raise UnsupportedAdapterError(
            f"Expected a diffusers UNet2DConditionModel (pipe.unet), got {type(model).__name__}. peft-cvae writes "
            "diffusers LoRAs for the UNet of Stable Diffusion pipelines; other models use LoraLayout.from_peft_model."
        )
    adapters = sorted(getattr(model, "peft_config", {}))
    if adapter_name not in adapters:
        raise UnsupportedAdapterError(
            f"The UNet has no LoRA adapter named {adapter_name!r} (it has {adapters}). Add one with "
            "unet.add_adapter(LoraConfig(...), adapter_name=...) or pass the right adapter_name."
        )
    state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {PEFT_PREFIX + key: tensor.detach().clone() for key, tensor in state_dict.items()}


def save_diffusers_lora_weights(
    state_dict: dict[str, torch.Tensor], lora_config: dict, save_directory: str | os.PathLike
) -> None:
    """Write `pytorch_lora_weights.safetensors` for `pipe.load_lora_weights(save_directory)`.

    `state_dict` is in PEFT saved form (`base_model.model.<unet module>...`); `lora_config` is the adapter's LoRA
    config as a dict and is stored as `lora_adapter_metadata`, so diffusers rebuilds the same `lora_alpha`. The caller
    makes the write atomic (`GeneratedAdapter.save_pretrained` writes into a staging folder).
    """
    _import_diffusers()
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    outside = [key for key in state_dict if not key.startswith(PEFT_PREFIX)]
    if outside:
        raise UnsupportedAdapterError(
            f"Tensor {outside[0]!r} is not in PEFT's saved form for a UNet (keys start with {PEFT_PREFIX!r}); "
            "build the layout with LoraLayout.from_diffusers(unet) or LoraLayout.from_peft_model(peft_unet)."
        )
    unet_layers = {key.removeprefix(PEFT_PREFIX): tensor.contiguous() for key, tensor in state_dict.items()}
    StableDiffusionPipeline.save_lora_weights(
        save_directory,
        unet_lora_layers=convert_state_dict_to_diffusers(unet_layers),
        unet_lora_adapter_metadata=dict(lora_config),
    )


def load_diffusers_lora(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read the UNet LoRA of a diffusers LoRA folder (`pytorch_lora_weights.safetensors`, as written by
    `save_lora_weights` or `unet.save_lora_adapter`): its LoRA config as a dict and its state dict in PEFT saved form.

    The file must carry `lora_adapter_metadata` (diffusers' training scripts write it): without it the LoRA's
    `lora_alpha` is unknown.
    """
    _import_diffusers()
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    from .layout import lora_config_to_dict

    file = Path(path) / DIFFUSERS_WEIGHTS_NAME
    if not file.is_file():
        raise MissingFileError(f"{path} has no {DIFFUSERS_WEIGHTS_NAME}, so it is not a diffusers LoRA folder.")
    try:
        state_dict, network_alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            str(path), weight_name=DIFFUSERS_WEIGHTS_NAME, return_lora_metadata=True
        )
    except Exception as error:  # safetensors raises its own error types for truncated files
        raise CorruptFileError(f"{file} is not a readable diffusers LoRA file ({error}). Save it again.") from error
    if any(key.startswith("text_encoder") for key in state_dict):
        raise UnsupportedAdapterError(
            f"{file} also holds text-encoder LoRA tensors; peft-cvae generates UNet LoRAs only. Train the bank's "
            "LoRAs on the UNet alone."
        )
    # Pipeline-level files (`save_lora_weights`) prefix keys and metadata with "unet."; model-level files
    # (`unet.save_lora_adapter`) do not.
    prefix = f"{UNET_PREFIX}." if any(key.startswith(f"{UNET_PREFIX}.") for key in state_dict) else ""
    unet_keys = [key for key in state_dict if key.startswith(prefix)]
    if network_alphas or len(unet_keys) != len(state_dict) or not all(".lora" in key for key in unet_keys):
        raise UnsupportedAdapterError(
            f"{file} is not a UNet LoRA in diffusers format (keys 'unet.<module>.lora...'); found keys such as "
            f"{next(iter(state_dict), None)!r}. Kohya/A1111 files are not supported: load them into a pipeline and "
            "save them with save_lora_weights(..., unet_lora_adapter_metadata=...)."
        )
    config = {key.removeprefix(prefix): value for key, value in (metadata or {}).items() if key.startswith(prefix)}
    if not config:
        raise UnsupportedAdapterError(
            f"{file} has no lora_adapter_metadata for the UNet, so its lora_alpha is unknown (diffusers would assume "
            "lora_alpha = r). Save it with save_lora_weights(..., unet_lora_adapter_metadata=lora_config.to_dict())."
        )
    config.setdefault("peft_type", "LORA")
    unet_state = convert_unet_state_dict_to_peft({key.removeprefix(prefix): state_dict[key] for key in unet_keys})
    return lora_config_to_dict(config), {PEFT_PREFIX + key: tensor for key, tensor in unet_state.items()}
