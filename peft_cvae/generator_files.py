"""Reading a saved generator folder (local, or a Hub repo's snapshot): find its files, read each once through
`VerifiedFolder` (integrity record, see `peft_cvae.integrity`), and check the config against the weights before
`PeftCVAEGenerator.from_pretrained` builds anything.

Kept apart from `modeling_peft_cvae.py` so the model file stays about the network; transformers' own loader then
only turns the verified state dict into a model.
"""

import json
from pathlib import Path

import torch
from transformers.utils import cached_file

from .configuration_peft_cvae import PeftCVAEConfig
from .constants import BIN_WEIGHTS_NAME, CONFIG_NAME, INTEGRITY_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from .errors import CorruptFileError, InvalidConfigError, MissingFileError
from .hub import is_repo_id
from .integrity import VerifiedFolder

__all__ = ["HUB_FILE_KWARGS", "generator_folder", "read_generator"]

HUB_FILE_KWARGS = ("cache_dir", "force_download", "local_files_only", "revision", "subfolder", "token")

# Which tensor of a saved generator shows each size of its config: (config field, tensor, axis). Checked against the
# weights before anything is built, so an edited config.json (patch_size 1e9, num_layers 1e6) is refused at once
# instead of allocating gigabytes or building for minutes.
_SIZE_EVIDENCE = (
    ("hidden_channels", "encoder.patch_embedding.weight", 0),
    ("patch_size", "encoder.patch_embedding.weight", 1),
    ("num_tokens", "encoder.position_embedding", 1),
    ("condition_size", "task_conditions", 1),
    ("latent_size", "decoder.latent_projection.weight", 1),
    ("kernel_size", "encoder.blocks.0.conv.weight", 2),
    ("numel", "param_offset", 0),
)
_FACTORISED_SIZE_EVIDENCE = (  # architecture="factorised": sizes derived from the layout and block_rows
    ("hidden_channels", "encoder.token_projection.weight", 0),
    ("block_size", "encoder.token_projection.weight", 1),
    ("max_blocks", "encoder.embedding.block.weight", 0),
    ("num_layer_ids", "encoder.embedding.layer.weight", 0),
    ("condition_size", "task_conditions", 1),
    ("latent_size", "decoder.latent_projection.weight", 1),
    ("numel", "param_offset", 0),
)


def _find_generator_file(path, name: str, kwargs: dict) -> Path | None | bool:
    """Where a generator file is: a local path, None if the folder or repo has no such file, or False if that
    cannot be told here (a Hub repo that cannot be reached: transformers then reports it)."""
    subfolder = kwargs.get("subfolder", "")
    if Path(path).is_dir():
        candidate = Path(path) / subfolder / name
        return candidate if candidate.is_file() else None
    try:
        found = cached_file(
            path,
            name,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **{key: kwargs[key] for key in HUB_FILE_KWARGS if key in kwargs},
        )
    except (OSError, ValueError):  # no such repo or revision, an invalid repo id: transformers says so
        return False
    return Path(found) if found else None


def generator_folder(path, kwargs: dict) -> Path | None:
    """The local folder of a saved generator (for a Hub repo: its snapshot in the cache, with every file of the
    generator downloaded), or None when that cannot be told (a Hub repo that cannot be reached). A missing config.json
    or missing weights is a clear error here: transformers would raise a bare OSError or look for a conversion pull
    request."""
    if Path(path).is_file():
        raise MissingFileError(
            f"{path} is a file, but a generator is a folder (config.json + model.safetensors) or a Hub repo id. "
            "Pass the folder that PeftCVAEGenerator.save_pretrained wrote."
        )
    if not Path(path).exists() and not is_repo_id(str(path)):  # e.g. "/data/gen" or "./gen": a path, not a repo id
        raise MissingFileError(
            f"The generator folder {path} does not exist (and it is not a Hub repo id). Check the path, or pass a "
            "repo id such as 'user/my-generator'."
        )
    config_file = _find_generator_file(path, CONFIG_NAME, kwargs)
    if config_file is False:
        return None
    where = f"{path}/{kwargs['subfolder']}" if kwargs.get("subfolder") else str(path)
    if config_file is None:
        raise MissingFileError(
            f"{where} has no config.json, so it is not a saved generator. Point to a folder or repo written by "
            "PeftCVAEGenerator.save_pretrained or push_to_hub."
        )
    if not any(_find_generator_file(path, name, kwargs) for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)):
        bin_note = ""
        if _find_generator_file(path, BIN_WEIGHTS_NAME, kwargs):
            bin_note = f"; {BIN_WEIGHTS_NAME} is never read: it is a pickle, which can run code"
        raise MissingFileError(
            f"The generator at {where} has a config.json but no weights (expected {SAFE_WEIGHTS_NAME}{bin_note}). "
            "It is incomplete: save or download the generator again."
        )
    record = _find_generator_file(path, INTEGRITY_NAME, kwargs)
    if record and not Path(path).is_dir():  # a Hub repo: every file the record lists is downloaded beside the others
        try:
            names = json.loads(record.read_bytes()).get("files", {})
        except (ValueError, AttributeError):
            names = {}  # a malformed record is reported by VerifiedFolder when it is read
        for name in names if isinstance(names, dict) else ():
            _find_generator_file(path, name, kwargs)
    return config_file.parent


def read_generator(files: VerifiedFolder, where) -> tuple[PeftCVAEConfig, dict[str, torch.Tensor]]:
    """The config and the weights of a saved generator, each file read once and checked, and checked against each
    other before anything is built."""
    data = files.read_json(CONFIG_NAME, what="generator config")
    try:
        config = PeftCVAEConfig.from_dict(data)
    except (InvalidConfigError, CorruptFileError):
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise InvalidConfigError(
            f"The generator config of {where} has a missing or wrongly typed field ({error}). Expected the "
            "config.json that PeftCVAEGenerator.save_pretrained writes: save or download the generator again."
        ) from error
    config._name_or_path = str(where)
    if files.exists(SAFE_WEIGHTS_NAME):
        state_dict = files.read_safetensors(
            SAFE_WEIGHTS_NAME,
            what="generator weights",
            advice="The file is truncated or corrupted: save or download the generator again.",
        )
    else:  # sharded by save_pretrained(max_shard_size=...)
        index = files.read_json(SAFE_WEIGHTS_INDEX_NAME, what="generator weights index")
        shards = index.get("weight_map")
        if not isinstance(shards, dict) or not all(isinstance(name, str) for name in shards.values()):
            raise CorruptFileError(f"The weights index of {where} has no valid weight_map; save the generator again.")
        state_dict = {}
        for shard in sorted(set(shards.values())):
            if Path(shard).name != shard:
                raise CorruptFileError(f"The weights index of {where} points outside the folder: {shard!r}.")
            state_dict.update(files.read_safetensors(shard, what="generator weights shard"))
    _check_weights_fit_config(config, state_dict, where)
    return config, state_dict


def _check_weights_fit_config(config: PeftCVAEConfig, state_dict: dict[str, torch.Tensor], where) -> None:
    """Raise `CorruptFileError` if the config's sizes contradict the weights file: the network is built from the
    config, so a config edited to huge sizes would otherwise allocate or loop before transformers compares shapes."""
    evidence = _SIZE_EVIDENCE
    sizes = {name: getattr(config, name, None) for name, _, _ in _SIZE_EVIDENCE if name != "numel"}
    if config.architecture == "factorised":
        from .factorised import TokenLayout

        evidence = _FACTORISED_SIZE_EVIDENCE
        tokens = TokenLayout(config.lora_layout, config.block_rows)
        sizes = {name: getattr(config, name, None) for name in ("hidden_channels", "condition_size", "latent_size")}
        sizes.update(block_size=tokens.block_size, max_blocks=tokens.max_blocks, num_layer_ids=tokens.num_layer_ids)
    sizes["numel"] = config.lora_layout.numel
    problem = None
    for name, key, axis in evidence:
        tensor = state_dict.get(key)
        found = tensor.shape[axis] if tensor is not None and tensor.dim() > axis else None
        if found != sizes[name]:
            shown = f"has {key} of shape {tuple(tensor.shape)}" if tensor is not None else f"has no tensor {key}"
            problem = f"it says {name}={sizes[name]}, but the weights file {shown}"
            break
    for part in ("encoder", "decoder"):
        layers = {key.split(".")[2] for key in state_dict if key.startswith(f"{part}.blocks.")}
        if problem is None and len(layers) != config.num_layers:
            problem = f"it says num_layers={config.num_layers}, but the weights file has {len(layers)} {part} blocks"
    if problem is None and config.task_memory != ("task_memory.task_means" in state_dict):
        found = "lacks" if config.task_memory else "has"
        problem = f"it says task_memory={config.task_memory}, but the weights file {found} the task memory"
    if problem is not None:
        raise CorruptFileError(
            f"The weights of {where} do not fit its config.json (mismatched sizes): {problem}. The config or the "
            "weights were edited, or come from two generators: save or download the generator again."
        )
