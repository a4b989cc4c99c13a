"""Baselines as tools: merge LoRA adapters (a bank's tasks, or any PEFT adapter folders) into one PEFT adapter.

Every benchmark compares the generator against a model soup, TIES and the nearest training task's checkpoint, so a
user should get the same baselines in one call (`merge_adapters`) or one command (`peft-cvae merge`) instead of
writing them by hand.

- `soup` is the model soup of the benchmarks ("mean of bank LoRAs"): the element-wise weighted average of every LoRA
  tensor (A, B, and any bias or magnitude), under the adapters' common config. It is computed here, not with PEFT's
  `linear`, because PEFT's `linear` scales A and B by sqrt(weight) each and sums them: for adapters that share their
  A (the same initialisation, as in every bank) its delta is `(sum_i sqrt(w_i))^2` times the weighted mean delta,
  the SUM of the deltas for equal weights 1/n (measured: four BBC News LoRAs merged that way took SmolLM2's sport
  perplexity from 55 to 103).
- The others are PEFT's own `PeftModel.add_weighted_adapter` (no re-implementation): `linear`, `cat`, `svd`, `ties`,
  `ties_svd`, `dare_linear`, `dare_ties`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune`,
  `magnitude_prune_svd`. `cat` and the `*_svd` methods merge the products B A exactly (cat keeps them all, at the sum
  of the ranks; svd re-factorises the merged delta at `svd_rank`), where an element-wise mean of A and B is not exact.
- `nearest` is the retrieval baseline: the bank task whose condition is closest (cosine) to a given condition, used as
  it is.

Default weights: 1/n each for the methods that sum the adapters (so the soup is a mean), 1 each for the `ties`
methods, whose disjoint merge already averages the agreeing values.
"""

import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from .adapter_io import load_adapter, lora_config_to_dict
from .constants import ADAPTER_WEIGHTS_NAME
from .errors import InvalidArgumentError, LayoutMismatchError
from .file_utils import atomic_directory, write_safetensors
from .integrity import write_integrity_record

__all__ = ["MERGE_METHODS", "MergedAdapter", "bank_adapters", "merge_adapters"]

PEFT_COMBINATIONS = (
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
MERGE_METHODS = ("soup", *PEFT_COMBINATIONS, "nearest")
PER_TASK_MODES = ("mean", "last", "all")


@dataclass
class MergedAdapter:
    """A merged LoRA adapter: PEFT state dict (saved-key form) plus its `LoraConfig`, and what it was merged from."""

    state_dict: dict[str, torch.Tensor]
    peft_config: LoraConfig
    method: str
    sources: list[str]
    weights: list[float] = field(default_factory=list)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `adapter_config.json` + `adapter_model.safetensors` (a normal PEFT adapter folder; the metadata says
        how it was merged) and the integrity record, atomically."""
        from . import __version__

        metadata = {
            "merged_by": "peft-cvae",
            "method": self.method,
            "sources": json.dumps(self.sources),
            "weights": json.dumps(self.weights),
            "peft_cvae_version": __version__,
        }
        with atomic_directory(save_directory) as staging:
            self.peft_config.save_pretrained(staging)
            tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in self.state_dict.items()}
            write_safetensors(tensors, staging / ADAPTER_WEIGHTS_NAME, metadata=metadata)
            write_integrity_record(staging)


def _mean_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        key: torch.stack([state[key].float() for state in states]).mean(dim=0).to(states[0][key]) for key in states[0]
    }


def bank_adapters(bank, per_task: str = "mean") -> list[tuple[str, dict, dict[str, torch.Tensor]]]:
    """A bank as `(name, LoRA config dict, state dict)` adapters to merge: per task, the element-wise mean of its
    checkpoints (`"mean"`: they lie along one converged training run, so their A and B share a basis) or its last
    checkpoint (`"last"`), or every checkpoint (`"all"`, named `task@step`)."""
    if per_task not in PER_TASK_MODES:
        raise InvalidArgumentError(f"per_task must be one of {', '.join(PER_TASK_MODES)}, got {per_task!r}.")
    config = lora_config_to_dict(bank.layout.peft_config())
    adapters = []
    for task in bank.task_names:
        checkpoints = bank.checkpoints_of(task)
        if per_task == "all":
            adapters += [(f"{task}@{c.step}", config, c.state_dict) for c in checkpoints]
        elif per_task == "last":
            adapters.append((task, config, checkpoints[-1].state_dict))
        else:
            adapters.append((task, config, _mean_state([c.state_dict for c in checkpoints])))
    return adapters


def _sources(bank_or_adapters, per_task: str) -> list[tuple[str, dict, dict[str, torch.Tensor]]]:
    from .adapter import GeneratedAdapter
    from .data import LoraBank

    if isinstance(bank_or_adapters, LoraBank):
        return bank_adapters(bank_or_adapters, per_task)
    if isinstance(bank_or_adapters, (str, os.PathLike)) or not isinstance(bank_or_adapters, (list, tuple)):
        raise InvalidArgumentError(
            f"Pass a LoraBank or a list of adapters (PEFT adapter folders or GeneratedAdapters), got "
            f"{type(bank_or_adapters).__name__}."
        )
    sources = []
    for index, item in enumerate(bank_or_adapters):
        if isinstance(item, GeneratedAdapter):
            sources.append((item.task or f"adapter-{index}", lora_config_to_dict(item.peft_config), item.state_dict))
        elif isinstance(item, (str, os.PathLike)):
            config, state = load_adapter(item)
            sources.append((str(item), config, state))
        else:
            raise InvalidArgumentError(
                f"Adapter {index} is a {type(item).__name__}; pass a folder or GeneratedAdapter."
            )
    return sources


def _soup(sources: list[tuple[str, dict, dict[str, torch.Tensor]]], weights: list[float]) -> MergedAdapter:
    """The element-wise weighted sum `sum_i w_i * tensor_i` of every LoRA tensor (a mean for the default weights
    1/n), under the adapters' common config: the model soup. Adapters with different configs or tensors have no
    element-wise average; `cat` or `svd` merge those."""
    label, config, first = sources[0]
    for other_label, other_config, other in sources[1:]:
        if other_config != config or other.keys() != first.keys():
            difference = sorted(k for k in config.keys() | other_config.keys() if config.get(k) != other_config.get(k))
            raise InvalidArgumentError(
                f"A soup averages the LoRA tensors element by element, so every adapter needs the same config and "
                f"tensors; {label!r} and {other_label!r} differ in "
                f"{difference or sorted(first.keys() ^ other.keys())[:3]}. Merge them with method='cat' or 'svd' "
                "(exact merges of the products B A), or pass adapters of one LoRA config."
            )
        for key, tensor in other.items():
            if tensor.shape != first[key].shape:
                raise InvalidArgumentError(
                    f"{key} has shape {tuple(tensor.shape)} in {other_label!r} but {tuple(first[key].shape)} in "
                    f"{label!r}; a soup needs adapters of one shape. Use method='cat' or 'svd'."
                )
    state = {
        key: sum(weight * state[key].float() for weight, (_, _, state) in zip(weights, sources)).to(first[key].dtype)
        for key in first
    }
    return MergedAdapter(state, LoraConfig(**config), "soup", [name for name, _, _ in sources], weights)


def _nearest(bank, condition, per_task: str) -> MergedAdapter:
    """The bank task whose condition is most cosine-similar to `condition`, as it is (its mean or last checkpoint)."""
    from .data import LoraBank

    if not isinstance(bank, LoraBank) or condition is None:
        raise InvalidArgumentError(
            "method='nearest' needs a LoraBank and condition= (a task vector, e.g. the bank encoder's encoding of a "
            "description) to find the nearest task by."
        )
    conditions = bank.condition_matrix().float()  # (T, cond)
    query = torch.as_tensor(condition, dtype=torch.float32).reshape(1, -1)
    if query.shape[1] != conditions.shape[1]:
        raise InvalidArgumentError(
            f"condition has {query.shape[1]} values but the bank's conditions have {conditions.shape[1]}; encode it "
            "with the bank's encoder (bank.condition_encoder)."
        )
    similarity = F.cosine_similarity(query, conditions, dim=-1)  # (T,)
    best = int(similarity.argmax())
    name, config, state = bank_adapters(bank, "last" if per_task == "last" else "mean")[best]
    return MergedAdapter(dict(state), LoraConfig(**config), "nearest", [name], [round(float(similarity[best]), 4)])


def merge_adapters(
    bank_or_adapters,
    method: str = "soup",
    *,
    weights: list[float] | None = None,
    base_model=None,
    per_task: str = "mean",
    condition=None,
    density: float = 0.5,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
) -> MergedAdapter:
    """Merge LoRA adapters into one: a model soup, or one of PEFT's `add_weighted_adapter` merges (see the module
    docstring for the methods).

    Args:
        bank_or_adapters: a `LoraBank` (merged per task, see `per_task`) or a list of PEFT adapter folders /
            `GeneratedAdapter`s of one base model.
        method: `"soup"` (the element-wise average of the LoRA tensors), a PEFT `combination_type`, or `"nearest"`.
        weights: one weight per adapter (default: 1/n, or 1 for the ties methods).
        base_model: the (plain, not PEFT) model the adapters belong to; PEFT merges on its LoRA layers, which are
            removed again afterwards (a soup and `nearest` need none). Default: the `base_model_name_or_path` the
            adapters record, as a causal LM.
        per_task: for a bank, `"mean"` / `"last"` checkpoint per task, or `"all"` checkpoints.
        condition: for `"nearest"`, the task vector to find the closest bank task for.
        density, majority_sign_method, svd_rank: passed to `add_weighted_adapter` (ties/dare/magnitude_prune, svd).

    Returns:
        a `MergedAdapter`; `save_pretrained(folder)` writes a normal PEFT adapter folder.
    """
    if method not in MERGE_METHODS:
        raise InvalidArgumentError(f"Unknown merge method {method!r}; choose one of {', '.join(MERGE_METHODS)}.")
    if method == "nearest":
        return _nearest(bank_or_adapters, condition, per_task)
    sources = _sources(bank_or_adapters, per_task)
    if not sources:
        raise InvalidArgumentError("There are no adapters to merge; pass at least one.")
    if weights is None:
        weights = [1.0 if "ties" in method else 1.0 / len(sources)] * len(sources)
    weights = [float(weight) for weight in weights]
    if len(weights) != len(sources):
        raise InvalidArgumentError(f"Got {len(weights)} weights for {len(sources)} adapters; pass one per adapter.")
    if method == "soup":
        return _soup(sources, weights)
    if isinstance(base_model, PeftModel):
        raise InvalidArgumentError("base_model must be the plain base model, not a PeftModel.")
    if base_model is None:
        from .base_model import load_base_model

        base_model = load_base_model(sources[0][1].get("base_model_name_or_path") or "")[0]
    names = [f"source_{index}" for index in range(len(sources))]
    model = None
    try:
        for name, (label, config, state) in zip(names, sources):
            if model is None:
                model = get_peft_model(base_model, LoraConfig(**config), adapter_name=name)
            else:
                model.add_adapter(name, LoraConfig(**config))
            result = set_peft_model_state_dict(model, state, adapter_name=name)
            missing = [key for key in result.missing_keys if f".{name}." in key and "lora_" in key]
            if result.unexpected_keys or missing:
                raise LayoutMismatchError(
                    f"The adapter {label!r} does not fit the base model ({len(missing)} missing, "
                    f"{len(result.unexpected_keys)} unexpected, e.g. {(result.unexpected_keys or missing)[0]!r}); "
                    "merge adapters of one base model and pass that model as base_model."
                )
        try:
            model.add_weighted_adapter(
                names,
                weights,
                "merged",
                combination_type=method,
                svd_rank=svd_rank,
                density=density if any(word in method for word in ("ties", "dare", "prune")) else None,
                majority_sign_method=majority_sign_method,
            )
        except ValueError as error:  # e.g. linear/ties of adapters with different ranks
            raise InvalidArgumentError(f"PEFT cannot merge these adapters with {method!r}: {error}") from error
        state = {
            key: tensor.detach().clone()
            for key, tensor in get_peft_model_state_dict(model, adapter_name="merged").items()
        }
        config = LoraConfig(**lora_config_to_dict(model.peft_config["merged"]))
    finally:
        if model is not None:
            model.unload()  # the caller's base model without the LoRA layers again
    return MergedAdapter(state, config, method, [label for label, _, _ in sources], weights)
