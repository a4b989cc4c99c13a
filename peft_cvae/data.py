"""`LoraBank`: the training data of a generator — LoRA checkpoints of one base model, grouped by task.

A bank holds, in order, (task, step, state dict) checkpoints that all share one `LoraLayout`, and one condition vector
(plus an optional description) per task. It is saved as a folder:

    bank.json                    manifest: format version, layout, tasks, checkpoints (task, step, file)
    conditions.safetensors       one condition vector per task, keyed by task name
    checkpoints/00000.safetensors   one PEFT state dict per checkpoint (the same tensors as adapter_model.safetensors)

Nothing is pickled; every file is JSON or safetensors.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConditionError, CorruptFileError, EmptyBankError, MissingFileError, UnknownTaskError
from .file_utils import atomic_directory, read_json, read_safetensors, write_json, write_safetensors
from .layout import LoraLayout, adapter_library, load_adapter

__all__ = ["LoraBank", "LoraCheckpoint"]

BANK_MANIFEST_NAME = "bank.json"
CONDITIONS_NAME = "conditions.safetensors"
BANK_FORMAT_VERSION = 1


@dataclass
class LoraCheckpoint:
    """One LoRA checkpoint of a task: its PEFT state dict and the training step it was taken at (if known)."""

    task: str
    state_dict: dict[str, torch.Tensor]
    step: int | None = None


class LoraBank:
    """An ordered collection of LoRA checkpoints of one base model, with a condition vector per task.

    Example:
        ```python
        bank = LoraBank.from_adapters(
            {"sport": ["ckpt/sport-100", "ckpt/sport-120"], "tech": ["ckpt/tech-120"]},
            conditions={"sport": sport_vector, "tech": tech_vector},
        )
        bank.save_pretrained("my-bank")
        ```
    """

    def __init__(self, layout: LoraLayout, condition_encoder: dict | None = None):
        self.layout = layout
        self.condition_encoder = condition_encoder
        self.checkpoints: list[LoraCheckpoint] = []
        self._conditions: dict[str, torch.Tensor] = {}
        self._descriptions: dict[str, str] = {}

    # ---- building -----------------------------------------------------------------------------------------------
    def add_checkpoint(self, task: str, state_dict: dict[str, torch.Tensor], step: int | None = None) -> None:
        """Append a checkpoint; its keys and shapes must match the bank's layout."""
        if not isinstance(task, str) or not task:
            raise ValueError(f"A task name must be a non-empty string, got {task!r}.")
        self.layout.flatten(state_dict)  # checks layout and finiteness, raising a clear error
        state_dict = {key: state_dict[key].detach().cpu().clone() for key in self.layout.keys}
        self.checkpoints.append(LoraCheckpoint(task=task, state_dict=state_dict, step=step))

    def set_condition(self, task: str, condition: torch.Tensor, description: str | None = None) -> None:
        """Set the condition vector (1-D) of a task, and optionally its description."""
        condition = torch.as_tensor(condition).detach().float().cpu().reshape(-1)
        if self._conditions:
            size = next(iter(self._conditions.values())).numel()
            if condition.numel() != size:
                raise ConditionError(
                    f"The condition of task {task!r} has {condition.numel()} values but the bank's other conditions "
                    f"have {size}. Encode every task with the same task encoder."
                )
        if not torch.isfinite(condition).all():
            raise ConditionError(f"The condition of task {task!r} contains NaN or Inf.")
        self._conditions[task] = condition.clone()
        if description is not None:
            self._descriptions[task] = description

    def set_description(self, task: str, description: str) -> None:
        """Set the text that describes a task (a text task encoder can turn it into the task's condition)."""
        if not isinstance(description, str):
            raise TypeError(f"The description of task {task!r} must be a string, got {type(description).__name__}.")
        self._descriptions[task] = description

    @classmethod
    def from_adapters(
        cls,
        adapters: dict[str, list[str | os.PathLike]],
        conditions: dict[str, torch.Tensor] | None = None,
        descriptions: dict[str, str] | None = None,
        condition_encoder: dict | None = None,
    ) -> "LoraBank":
        """Build a bank from saved PEFT adapters: `{task: [adapter folder or Hub repo id, ...]}`.

        The layout is taken from the first adapter; every other one must match it (same base model, rank and target
        modules) and have the same LoRA config.
        """
        if not adapters or not any(adapters.values()):
            raise EmptyBankError("No adapters were given. Pass {task name: [adapter folder, ...]} with at least one.")
        bank = None
        for task, paths in adapters.items():
            for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
                config, state_dict = load_adapter(path)
                if bank is None:
                    layout = LoraLayout.from_state_dict(state_dict, config, library=adapter_library(path))
                    bank = cls(layout, condition_encoder=condition_encoder)
                bank.layout.check_config(config)
                bank.add_checkpoint(task, state_dict)
        for task, condition in (conditions or {}).items():
            bank.set_condition(task, condition)
        bank._descriptions.update(descriptions or {})
        return bank

    # ---- reading ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.checkpoints)

    def __iter__(self):
        return iter(self.checkpoints)

    def __repr__(self) -> str:
        counts = ", ".join(f"{task}: {len(self.checkpoints_of(task))}" for task in self.task_names)
        return f"LoraBank({len(self)} checkpoints of {self.layout.numel} parameters; {counts})"

    @property
    def task_names(self) -> list[str]:
        """Tasks in order of first appearance."""
        return list(dict.fromkeys(checkpoint.task for checkpoint in self.checkpoints))

    def checkpoints_of(self, task: str) -> list[LoraCheckpoint]:
        return [checkpoint for checkpoint in self.checkpoints if checkpoint.task == task]

    def description(self, task: str) -> str:
        return self._descriptions.get(task, "")

    def condition(self, task: str) -> torch.Tensor:
        if task not in self._conditions:
            raise UnknownTaskError(
                f"Task {task!r} has no condition vector. Set one with bank.set_condition({task!r}, vector) or pass "
                "conditions= when building the bank."
            )
        return self._conditions[task]

    @property
    def condition_size(self) -> int:
        self._check_trainable()
        return self.condition(self.task_names[0]).numel()

    def condition_matrix(self) -> torch.Tensor:
        """Conditions of the tasks, one row per task in `task_names` order. Shape (T, cond)."""
        return torch.stack([self.condition(task) for task in self.task_names])

    def vectors(self) -> torch.Tensor:
        """Flat vectors of all checkpoints, in order. Shape (K, N)."""
        self._check_trainable()
        return torch.stack([self.layout.flatten(checkpoint.state_dict) for checkpoint in self.checkpoints])

    def checkpoint_conditions(self) -> torch.Tensor:
        """The condition of each checkpoint's task, in checkpoint order. Shape (K, cond)."""
        return torch.stack([self.condition(checkpoint.task) for checkpoint in self.checkpoints])

    def _check_trainable(self) -> None:
        if len(self.checkpoints) < 2:
            raise EmptyBankError(
                f"The bank has {len(self.checkpoints)} checkpoint(s); a generator needs at least 2 to learn anything "
                "(normalisation statistics are computed over the bank). Add checkpoints of more steps or tasks."
            )
        for task in self.task_names:
            self.condition(task)

    # ---- saving and loading -------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the bank folder (manifest + safetensors), atomically."""
        entries = []
        with atomic_directory(save_directory) as staging:
            (staging / "checkpoints").mkdir()
            for index, checkpoint in enumerate(self.checkpoints):
                file = f"checkpoints/{index:05d}.safetensors"
                write_safetensors(checkpoint.state_dict, staging / file)
                entries.append({"task": checkpoint.task, "step": checkpoint.step, "file": file})
            if self._conditions:
                write_safetensors(self._conditions, staging / CONDITIONS_NAME)
            manifest = {
                "format_version": BANK_FORMAT_VERSION,
                "layout": self.layout.to_dict(),
                "condition_encoder": self.condition_encoder,
                "tasks": [{"name": task, "description": self.description(task)} for task in self.task_names],
                "checkpoints": entries,
            }
            write_json(manifest, staging / BANK_MANIFEST_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "LoraBank":
        """Load a bank folder written by `save_pretrained`."""
        directory = Path(directory)
        manifest = read_json(directory / BANK_MANIFEST_NAME, what="bank manifest")
        for name, kind in (("format_version", int), ("layout", dict), ("tasks", list), ("checkpoints", list)):
            if not isinstance(manifest.get(name), kind):
                raise CorruptFileError(
                    f"The bank manifest {directory / BANK_MANIFEST_NAME} lacks a valid {name!r} field "
                    f"(expected a {kind.__name__}). Save the bank again with LoraBank.save_pretrained."
                )
        if manifest["format_version"] > BANK_FORMAT_VERSION:
            raise CorruptFileError(
                f"The bank was written in format {manifest['format_version']}, newer than this peft-cvae understands "
                f"({BANK_FORMAT_VERSION}). Upgrade peft-cvae."
            )
        bank = cls(LoraLayout.from_dict(manifest["layout"]), condition_encoder=manifest.get("condition_encoder"))
        for entry in manifest["checkpoints"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or "task" not in entry:
                raise CorruptFileError(
                    f"A checkpoint entry of {directory / BANK_MANIFEST_NAME} is malformed: {entry!r}"
                )
            path = (directory / entry["file"]).resolve()
            if directory.resolve() not in path.parents:
                raise CorruptFileError(f"The bank manifest points outside the bank folder: {entry['file']!r}.")
            if not path.is_file():
                raise MissingFileError(
                    f"The bank manifest lists {entry['file']} but {path} does not exist. The bank folder is "
                    "incomplete: copy or download all of it again."
                )
            bank.add_checkpoint(entry["task"], read_safetensors(path, what="bank checkpoint"), entry.get("step"))
        descriptions = {task["name"]: task.get("description", "") for task in manifest["tasks"]}
        if (directory / CONDITIONS_NAME).exists():
            for task, condition in read_safetensors(directory / CONDITIONS_NAME, what="bank conditions").items():
                bank.set_condition(task, condition)
        bank._descriptions.update({task: text for task, text in descriptions.items() if text})
        return bank
