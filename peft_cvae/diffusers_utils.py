"""LoRAs on a diffusers UNet: read them into a bank, and write generated ones in the form diffusers loads.

A LoRA on a diffusers UNet is a PEFT LoRA like any other: diffusers' training scripts add it with
`unet.add_adapter(LoraConfig(...))` and `peft.get_peft_model(unet, config)` wraps the UNet the same way. The bank and
the generator therefore work on PEFT's saved key form (`base_model.model.<module>.lora_A.weight`), and the layout
records `library="diffusers"` so that a generated adapter is written twice:

    adapter_config.json + adapter_model.safetensors   PEFT, for `PeftModel.from_pretrained(unet, dir)`
    pytorch_lora_weights.safetensors                  diffusers, for `pipe.load_lora_weights(dir)`

The diffusers file is written by diffusers itself (`StableDiffusionPipeline.save_lora_weights`, keys in PEFT's form as
`unet.save_lora_adapter` writes them) and carries the LoRA config as `lora_adapter_metadata`. Without that metadata
diffusers assumes `lora_alpha = r` and silently rescales the adapter by `r / lora_alpha`, so it is always written. (A
file read back without it is taken with lora_alpha = r, as diffusers takes it, with a warning.)

diffusers is an optional dependency (`pip install "peft-cvae[diffusers]"`); it is imported only when needed. Reading
diffusers and Kohya/A1111 LoRA files lives in `peft_cvae.diffusers_lora_files`.
"""

import os
import sys

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict

from .constants import DIFFUSERS_WEIGHTS_NAME
from .errors import UnsupportedAdapterError
from .import_utils import require_diffusers

__all__ = [
    "DIFFUSERS_WEIGHTS_NAME",
    "get_diffusers_lora_state_dict",
    "is_diffusers_unet",
    "save_diffusers_lora_weights",
]

# PEFT's saved keys for a `PeftModel` around the UNet start with this; diffusers' keys start with the component name.
PEFT_PREFIX = "base_model.model."
UNET_PREFIX = "unet"


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
    require_diffusers()
    from diffusers import StableDiffusionPipeline  # an optional dependency, imported only when it is needed

    outside = [key for key in state_dict if not key.startswith(PEFT_PREFIX)]
    if outside:
        raise UnsupportedAdapterError(
            f"Tensor {outside[0]!r} is not in PEFT's saved form for a UNet (keys start with {PEFT_PREFIX!r}); "
            "build the layout with LoraLayout.from_diffusers(unet) or LoraLayout.from_peft_model(peft_unet)."
        )
    # Keys stay in PEFT's form (`<module>.lora_A.weight`), as `unet.save_lora_adapter` writes them. diffusers' older
    # form (`convert_state_dict_to_diffusers`) renames attention projections only (`to_q.lora.down`), and
    # `load_lora_adapter` converts a file back only when its *first* key lacks `lora_A`: with a LoRA on `proj_in`,
    # `ff` or a resnet too, that mixed file silently lost the attention LoRAs on load.
    unet_layers = {key.removeprefix(PEFT_PREFIX): tensor.contiguous() for key, tensor in state_dict.items()}
    StableDiffusionPipeline.save_lora_weights(
        save_directory, unet_lora_layers=unet_layers, unet_lora_adapter_metadata=dict(lora_config)
    )
