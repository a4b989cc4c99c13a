"""Reading the UNet LoRA files of the diffusers ecosystem into PEFT's saved form, by diffusers' own converters.

Three kinds of `.safetensors` file are accepted:

- diffusers files with `lora_adapter_metadata` (`save_lora_weights(..., unet_lora_adapter_metadata=...)`, diffusers'
  training scripts): the LoRA config is read from the metadata, tensors are taken as they are.
- diffusers files without that metadata (older scripts, many Hub repos): diffusers itself assumes `lora_alpha = r`
  (scale 1) for them, and so does peft-cvae, with a warning. The config is derived by diffusers' `get_peft_kwargs`
  from the tensor shapes, as `pipe.load_lora_weights` derives it.
- Kohya / A1111 files (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`): keys are converted by
  `StableDiffusionPipeline.lora_state_dict` (`_convert_non_diffusers_lora_to_diffusers`, and for SDXL files that name
  blocks the original way, `input_blocks_4_1_...`, its remapping with the UNet's config) and
  `convert_unet_state_dict_to_peft`.

Alpha. Kohya scales each module by its own `alpha / rank`. A bank needs one LoRA config for all its checkpoints, while
Kohya files differ in alpha from file to file and even from module to module. So each module's `alpha / rank` is
multiplied into its `lora_B` (the product `scale * B @ A` is unchanged, up to float rounding) and the config says
`lora_alpha = r` (scale 1, the config diffusers derives for a file without alphas). A bank can then mix Kohya files of
any alphas with metadata-less diffusers files of the same ranks. Each module is converted on its own so that its alpha
stays bound to its tensors: diffusers' whole-file conversion names the alphas of attention projections
(`...attn1.processor.to_q_lora.down.weight.alpha`) so that `get_peft_kwargs` never matches them to a module, and
`pipe.load_lora_weights` of a file whose attention alphas differ from the rest silently uses the most common alpha
there (tested in tests/test_diffusers_formats.py).

Refused with `UnsupportedAdapterError`: LyCORIS networks other than plain LoRA (LoHa `hada_*`, LoKr `lokr_*`, Tucker
`lora_mid`), DoRA (`dora_scale`: diffusers would drop the magnitudes with a log line), SDXL files with original block
names when no `unet_config` is given. Text-encoder parts (`lora_te*`, `text_encoder*`) are left out with a warning:
peft-cvae generates UNet LoRAs.
"""

import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from peft import LoraConfig

from .constants import DIFFUSERS_WEIGHTS_NAME
from .diffusers_utils import PEFT_PREFIX, UNET_PREFIX
from .errors import CorruptFileError, LayoutMismatchError, MissingFileError, UnsupportedAdapterError
from .import_utils import require_diffusers

__all__ = ["diffusers_lora_file", "is_kohya_state_dict", "load_diffusers_lora"]

KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
KOHYA_LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
# Names the original (sgm/LDM) UNet gives its blocks; Kohya's SDXL LoRAs use them, diffusers' UNet does not.
SGM_BLOCK_NAMES = ("input_blocks", "middle_block", "output_blocks")
# Keys of LyCORIS networks that are not plain LoRA: Hadamard (LoHa), Kronecker (LoKr), Tucker-decomposed convolutions.
LYCORIS_MARKERS = ("hada_", "lokr_", "lora_mid", ".w_norm", ".b_norm", ".diff")
TEXT_ENCODER_PREFIXES = ("text_encoder",)


def diffusers_lora_file(path: str | os.PathLike) -> Path:
    """The `.safetensors` file behind `path`: the file itself, or a folder's `pytorch_lora_weights.safetensors`."""
    path = Path(str(path))
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UnsupportedAdapterError(
                f"{path} is not a .safetensors file. LoRA files are read as safetensors only (never pickle): convert "
                "a .ckpt/.pt LoRA with safetensors.torch.save_file after checking where it came from."
            )
        return path
    file = path / DIFFUSERS_WEIGHTS_NAME
    if not file.is_file():
        raise MissingFileError(f"{path} has no {DIFFUSERS_WEIGHTS_NAME}, so it is not a diffusers LoRA folder.")
    return file


def is_kohya_state_dict(keys) -> bool:
    """Whether the keys are Kohya/A1111's (`lora_unet_...`, `lora_te_...`), the test diffusers' `lora_state_dict`
    itself applies before converting."""
    keys = list(keys)
    return bool(keys) and all(key.startswith((KOHYA_UNET_PREFIX, *KOHYA_TEXT_ENCODER_PREFIXES)) for key in keys)


def _read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
    except Exception as error:  # safetensors raises its own error types for truncated or non-safetensors files
        raise CorruptFileError(f"{file} is not a readable diffusers LoRA file ({error}). Save it again.") from error


def _warn_text_encoder(file: Path, count: int) -> None:
    warnings.warn(
        f"{file}: left out {count} text-encoder LoRA tensors. peft-cvae reads and generates the UNet part only, so "
        "the bank's checkpoint (and any adapter generated from it) lacks this LoRA's effect on the prompt encoding.",
        UserWarning,
        stacklevel=4,
    )


def _config_from_shapes(peft_state: dict[str, torch.Tensor]) -> dict:
    """The LoRA config diffusers derives for a file without alphas or metadata (`get_peft_kwargs`, as in
    `load_lora_adapter`): r and lora_alpha = the most common rank, other ranks in rank_pattern and alpha_pattern, so
    every module has scale 1."""
    from diffusers.utils.peft_utils import get_peft_kwargs

    from .adapter_io import lora_config_to_dict  # adapter_io imports this module: import at call time

    ranks = {f"^{key}": tensor.shape[1] for key, tensor in peft_state.items() if "lora_B" in key and tensor.ndim > 1}
    kwargs = get_peft_kwargs(ranks, None, peft_state, is_unet=True)
    kwargs["target_modules"] = sorted(kwargs["target_modules"])  # diffusers builds it from a set: fix the order
    return lora_config_to_dict(LoraConfig(**kwargs))


def _unet_config(unet_config):
    """diffusers' SGM remapping reads `unet_config.layers_per_block` as an attribute: accept a plain dict too."""
    if unet_config is None or hasattr(unet_config, "layers_per_block"):
        return unet_config
    return SimpleNamespace(**dict(unet_config))


def _check_fits_unet(file: Path, state: dict[str, torch.Tensor], unet_config) -> None:
    """With the UNet's config at hand, check every converted module exists in that UNet and its LoRA fits the module's
    shape: a file of another model (an SD 1.x LoRA for SDXL) or a name diffusers could not map fails here, not when
    a generated adapter is loaded. The UNet is built on the meta device: no memory, no weights."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    modules = dict(unet.named_modules())
    for key, tensor in state.items():
        name, _, which = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        module = modules.get(name)
        if module is None:
            raise LayoutMismatchError(
                f"{file}: the LoRA on {name!r} has no module of that name in the given UNet. The file was trained "
                "for another model (an SD 1.x LoRA for SDXL?) or names it in a way diffusers does not convert."
            )
        size_in = getattr(module, "in_features", getattr(module, "in_channels", None))
        size_out = getattr(module, "out_features", getattr(module, "out_channels", None))
        expected = size_in if which.startswith("A") else size_out
        found = tensor.shape[1] if which.startswith("A") else tensor.shape[0]
        if expected != found:
            raise LayoutMismatchError(
                f"{file}: the LoRA on {name!r} has {found} {'input' if which.startswith('A') else 'output'} "
                f"features but the given UNet's module has {expected}. The file was trained for another model."
            )


def _load_kohya(file: Path, raw: dict[str, torch.Tensor], unet_config) -> tuple[dict, dict[str, torch.Tensor]]:
    """A Kohya/A1111 LoRA file in PEFT saved form, each module's alpha / rank multiplied into its lora_B."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    odd = [key for key in raw if any(marker in key for marker in LYCORIS_MARKERS) or "dora_scale" in key]
    odd += [key for key in raw if not key.endswith(KOHYA_LORA_SUFFIXES)]
    if odd:
        raise UnsupportedAdapterError(
            f"{file} holds {odd[0]!r}: a LyCORIS network other than plain LoRA (LoHa, LoKr, Tucker LoCon) or a DoRA. "
            "peft-cvae reads plain LoRA (lora_down/lora_up/alpha, on linear or conv layers) only; train the bank's "
            "LoRAs as plain LoRA (sd-scripts networks.lora, or LyCORIS with algo=lora and no cp/dora)."
        )
    text_encoder = [key for key in raw if key.startswith(KOHYA_TEXT_ENCODER_PREFIXES)]
    if text_encoder:
        _warn_text_encoder(file, len(text_encoder))
    modules = sorted({key.split(".")[0] for key in raw if key.startswith(KOHYA_UNET_PREFIX)})
    if not modules:
        raise UnsupportedAdapterError(f"{file} has no UNet LoRA tensors (lora_unet_...); nothing to put in a bank.")
    sgm = [module for module in modules if any(name in module for name in SGM_BLOCK_NAMES)]
    if unet_config is None and sgm:
        raise UnsupportedAdapterError(
            f"{file} names UNet blocks the original way ({sgm[0]}, as Kohya's SDXL LoRAs do); mapping them to "
            "diffusers' UNet needs the UNet's config. Pass unet_config=pipe.unet.config (or "
            "UNet2DConditionModel.load_config(model_id, subfolder='unet'))."
        )
    sgm_config = _unet_config(unet_config)
    state = {}
    for module in modules:
        down, up = f"{module}.lora_down.weight", f"{module}.lora_up.weight"
        if down not in raw or up not in raw:
            raise CorruptFileError(f"{file} has {module} without both lora_down and lora_up weights. Save it again.")
        part = {down: raw[down], up: raw[up]}
        if f"{module}.alpha" in raw:
            part[f"{module}.alpha"] = raw[f"{module}.alpha"]
        try:
            # diffusers' own conversion, one module at a time so the alpha stays with its tensors
            converted, alphas = StableDiffusionPipeline.lora_state_dict(part, unet_config=sgm_config)
        except (ValueError, KeyError, IndexError) as error:
            raise UnsupportedAdapterError(f"diffusers cannot convert {module} of {file}: {error}") from error
        peft_part = convert_unet_state_dict_to_peft(
            {key.removeprefix(f"{UNET_PREFIX}."): tensor for key, tensor in converted.items()}
        )
        rank = raw[down].shape[0]
        alpha = next(iter(alphas.values())) if alphas else 0.0
        scale = (alpha if alpha else rank) / rank  # sd-scripts: a missing or zero alpha means alpha = rank
        for key, tensor in peft_part.items():
            if "lora_B" in key and scale != 1.0:
                tensor = (tensor.float() * scale).to(tensor.dtype)
            if PEFT_PREFIX + key in state:
                raise UnsupportedAdapterError(f"{file}: two Kohya modules convert to one UNet module ({key}).")
            state[PEFT_PREFIX + key] = tensor.contiguous()
    return _config_from_shapes({key.removeprefix(PEFT_PREFIX): tensor for key, tensor in state.items()}), state


def _load_diffusers_format(file: Path, raw_keys) -> tuple[dict, dict[str, torch.Tensor]]:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    from .adapter_io import lora_config_to_dict

    try:
        state_dict, network_alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            str(file), return_lora_metadata=True
        )
    except Exception as error:  # safetensors raises its own error types for truncated files
        raise CorruptFileError(f"{file} is not a readable diffusers LoRA file ({error}). Save it again.") from error
    if any("dora_scale" in key or "lora_magnitude_vector" in key for key in raw_keys):
        raise UnsupportedAdapterError(
            f"{file} is a DoRA (magnitude vectors): not supported yet. Train the bank's LoRAs with use_dora=False."
        )
    text_encoder = [key for key in state_dict if key.startswith(TEXT_ENCODER_PREFIXES)]
    if text_encoder:
        _warn_text_encoder(file, len(text_encoder))
        state_dict = {key: tensor for key, tensor in state_dict.items() if key not in text_encoder}
    # Pipeline-level files (`save_lora_weights`) prefix keys and metadata with "unet."; model-level files
    # (`unet.save_lora_adapter`) do not.
    prefix = f"{UNET_PREFIX}." if any(key.startswith(f"{UNET_PREFIX}.") for key in state_dict) else ""
    unet_keys = [key for key in state_dict if key.startswith(prefix)]
    if (
        not unet_keys
        or network_alphas
        or len(unet_keys) != len(state_dict)
        or not all(".lora" in k for k in unet_keys)
    ):
        raise UnsupportedAdapterError(
            f"{file} is not a UNet LoRA in diffusers or Kohya format (keys 'unet.<module>.lora...' or "
            f"'lora_unet_<module>.lora_down.weight'); found keys such as {next(iter(raw_keys), None)!r}."
        )
    unet_state = convert_unet_state_dict_to_peft({key.removeprefix(prefix): state_dict[key] for key in unet_keys})
    if any(".lora_" not in key or not key.endswith(".weight") for key in unet_state):
        bad = next(key for key in unet_state if ".lora_" not in key or not key.endswith(".weight"))
        raise UnsupportedAdapterError(f"{file} holds {bad!r}, which is not a LoRA A/B weight of the UNet.")
    config = {key.removeprefix(prefix): value for key, value in (metadata or {}).items() if key.startswith(prefix)}
    if config:
        config.setdefault("peft_type", "LORA")
        config = lora_config_to_dict(config)
    else:
        config = _config_from_shapes(unet_state)
        warnings.warn(
            f"{file} has no lora_adapter_metadata, so its lora_alpha is not recorded; read with lora_alpha = r = "
            f"{config['r']} (scale 1), as pipe.load_lora_weights does. If it was trained with another alpha, save it "
            "again with save_lora_weights(..., unet_lora_adapter_metadata=lora_config.to_dict()).",
            UserWarning,
            stacklevel=3,
        )
    return config, {PEFT_PREFIX + key: tensor.contiguous() for key, tensor in unet_state.items()}


def load_diffusers_lora(path: str | os.PathLike, unet_config=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read the UNet LoRA of a diffusers-ecosystem LoRA file: its LoRA config as a dict and its state dict in PEFT
    saved form (`base_model.model.<module>.lora_A.weight`, ...).

    Args:
        path: a `.safetensors` file (diffusers or Kohya/A1111 format), or a folder holding
            `pytorch_lora_weights.safetensors`.
        unet_config: the config of the UNet the LoRA was trained on (`pipe.unet.config` or a dict). Needed for
            Kohya SDXL files that name blocks the original way (`lora_unet_input_blocks_4_1_...`), as
            `StableDiffusionXLPipeline.load_lora_weights` passes `unet_config=self.unet.config`. When given, every
            converted module is also checked to exist in that UNet with matching features (`LayoutMismatchError`).

    See the module docstring for how alphas are carried and what is refused.
    """
    require_diffusers()
    file = diffusers_lora_file(path)
    raw, _ = _read_safetensors(file)
    if is_kohya_state_dict(raw):
        config, state = _load_kohya(file, raw, unet_config)
    else:
        config, state = _load_diffusers_format(file, list(raw))
    if unet_config is not None:
        _check_fits_unet(file, state, unet_config)
    return config, state
