"""`LoraBank`: the training data of a generator — LoRA checkpoints of one base model, grouped by task.

A bank holds, in order, (task, step, state dict) checkpoints that all share one `LoraLayout`, and one condition vector
(plus an optional description) per task. It is saved as a folder:

    bank.json                    manifest: format version, layout, tasks, checkpoints (task, step, file, sha256)
    conditions.safetensors       one condition vector per task, keyed by task name
    checkpoints/00000.safetensors   one PEFT state dict per checkpoint (the same tensors as adapter_model.safetensors)

Nothing is pickled; every file is JSON or safetensors.
"""

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import DatasetCard, DatasetCardData, HfApi, snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .errors import ConditionError, CorruptFileError, EmptyBankError, MissingFileError, UnknownTaskError
from .file_utils import atomic_directory, read_json, read_safetensors, sha256_file, write_json, write_safetensors
from .layout import LoraLayout, adapter_library, load_adapter
from .task_data import check_task_name

__all__ = ["LoraBank", "LoraCheckpoint"]

BANK_MANIFEST_NAME = "bank.json"
CONDITIONS_NAME = "conditions.safetensors"
BANK_FORMAT_VERSION = 1
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # all that is read of a PEFT adapter repo
BANK_FILE_PATTERNS = [BANK_MANIFEST_NAME, CONDITIONS_NAME, "checkpoints/*.safetensors"]  # all a bank repo holds


def _download_from_hub(
    repo_id: str, *, repo_type: str, files: list[str], what: str, revision: str | None, token: str | bool | None
) -> Path:
    """Download `files` (glob patterns) of one commit of a Hub repo; turn every "not there" into `MissingFileError`."""
    kind = "dataset repo" if repo_type == "dataset" else "repo"
    at = f" at revision {revision!r}" if revision else ""
    try:
        folder = snapshot_download(repo_id, repo_type=repo_type, allow_patterns=files, revision=revision, token=token)
    except RevisionNotFoundError as error:
        raise MissingFileError(
            f"The Hub {kind} {repo_id!r} has no revision {revision!r}. Pass an existing branch, tag or commit."
        ) from error
    except RepositoryNotFoundError as error:  # also gated repos and private repos without a token
        raise MissingFileError(
            f"The Hub {kind} {repo_id!r} (expected: {what}) does not exist or you cannot access it. Check the repo "
            "id, and pass token= (or log in with `hf auth login`) for a private repo."
        ) from error
    except HFValidationError as error:
        raise MissingFileError(
            f"{repo_id!r} is not a valid Hub repo id ({error}); expected 'name' or 'namespace/name'. For adapter "
            "folders on disk use LoraBank.from_adapters; for a bank folder, LoraBank.from_pretrained(Path(...))."
        ) from error
    except LocalEntryNotFoundError as error:  # offline, or the Hub cannot be reached, and nothing is cached
        raise MissingFileError(
            f"Cannot download the Hub {kind} {repo_id!r}{at}: the Hub cannot be reached and it is not in the "
            f"local cache ({error}). Connect to the Hub, or pass a local folder."
        ) from error
    return Path(folder)


def _check_manifest_entries(manifest: dict, where: Path) -> None:
    """Raise `CorruptFileError` if the task or checkpoint entries of a bank manifest have missing or bad fields."""
    for entry in manifest["checkpoints"]:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("file"), str)
            or "\x00" in entry["file"]
            or not isinstance(entry.get("task"), str)
            or not entry["task"]
            or not (
                entry.get("step") is None or (isinstance(entry["step"], int) and not isinstance(entry["step"], bool))
            )
        ):
            raise CorruptFileError(
                f"A checkpoint entry of the bank manifest {where} is malformed: {str(entry)[:200]}. Expected "
                '{"task": <non-empty string>, "step": <integer or null>, "file": <path inside the bank>}; save the '
                "bank again with LoraBank.save_pretrained."
            )
    for task in manifest["tasks"]:
        if not isinstance(task, dict) or not isinstance(task.get("name"), str):
            raise CorruptFileError(
                f"A task entry of the bank manifest {where} is malformed: {str(task)[:200]}. Expected "
                '{"name": <string>, "description": <string>}; save the bank again with LoraBank.save_pretrained.'
            )
        if not isinstance(task.get("description", ""), str):
            raise CorruptFileError(f"Task {task['name']!r} of the bank manifest {where} has a non-string description.")
    hashes = [entry.get("sha256") for entry in manifest["checkpoints"]] + [manifest.get("conditions_sha256")]
    for value in hashes:  # absent in banks saved before checksums were recorded
        if value is not None and not (isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value)):
            raise CorruptFileError(
                f"The bank manifest {where} has a malformed sha256 {str(value)[:80]!r}; expected 64 hex digits. "
                "Save the bank again with LoraBank.save_pretrained."
            )
    if not isinstance(manifest.get("condition_encoder"), (dict, type(None))):
        raise CorruptFileError(
            f"The bank manifest {where} has condition_encoder={manifest['condition_encoder']!r}; expected an object "
            "or null. Save the bank again with LoraBank.save_pretrained."
        )


def _check_sha256(path: Path, expected: str | None, what: str) -> None:
    """Raise `CorruptFileError` if a file's SHA-256 differs from the one the manifest recorded (if it recorded one)."""
    if expected is None:
        return
    found = sha256_file(path)
    if found != expected:
        raise CorruptFileError(
            f"The {what} {path} has sha256 {found[:12]}..., but the bank manifest recorded {expected[:12]}...: the "
            "file changed or was damaged after the bank was saved. Copy or download the whole bank again."
        )


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
        check_task_name(task)  # names become folder and Hub path components: refuse "../x", "/abs", "", NUL
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

    def encode_conditions(self, encoder, tasks: dict[str, str | list[str]]) -> None:
        """Set each task's condition to `encoder.encode(...)` and record `encoder.to_dict()` as the bank's encoder.

        Args:
            encoder: a `TaskEncoder` (`TextTaskEncoder`, `HiddenStateTaskEncoder`).
            tasks: `{task: description}` (a string, also stored as the task's description) or `{task: [example
                texts]}` for in-context vectors.
        """
        spec = encoder.to_dict()
        if self.condition_encoder not in (None, spec) and set(self._conditions) - set(tasks):
            raise ConditionError(
                f"The bank's other conditions came from {self.condition_encoder}, not {spec}. Encode every task with "
                "the same task encoder."
            )
        encoded = {task: encoder.encode(text) for task, text in tasks.items()}  # a failure here changes nothing
        previous = dict(self._conditions), dict(self._descriptions)
        if not set(self._conditions) - set(tasks):
            self._conditions.clear()  # every task is re-encoded: the new encoder may have another size
        try:
            for task, text in tasks.items():
                self.set_condition(task, encoded[task], description=text if isinstance(text, str) else None)
        except ConditionError:
            self._conditions, self._descriptions = previous
            raise
        self.condition_encoder = spec

    @classmethod
    def from_adapters(
        cls,
        adapters: dict[str, list[str | os.PathLike]],
        conditions: dict[str, torch.Tensor] | None = None,
        descriptions: dict[str, str] | None = None,
        condition_encoder: dict | None = None,
        library: str | None = None,
    ) -> "LoraBank":
        """Build a bank from saved PEFT adapters: `{task: [adapter folder or Hub repo id, ...]}`.

        The layout is taken from the first adapter; every other one must match it (same base model, rank and target
        modules) and have the same LoRA config. Local diffusers LoRA folders (`pytorch_lora_weights.safetensors`
        with `lora_adapter_metadata`) are read too and give `layout.library == "diffusers"`; pass
        `library="diffusers"` for PEFT folders of a diffusers UNet (`PeftModel.save_pretrained`), so generated
        adapters are also written for `pipe.load_lora_weights`.
        """
        if not adapters or not any(adapters.values()):
            raise EmptyBankError("No adapters were given. Pass {task name: [adapter folder, ...]} with at least one.")
        bank = None
        for task, paths in adapters.items():
            for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
                config, state_dict = load_adapter(path)
                if bank is None:
                    layout = LoraLayout.from_state_dict(state_dict, config, library=library or adapter_library(path))
                    bank = cls(layout, condition_encoder=condition_encoder)
                bank.layout.check_config(config)
                bank.add_checkpoint(task, state_dict)
        for task, condition in (conditions or {}).items():
            bank.set_condition(task, condition)
        bank._descriptions.update(descriptions or {})
        return bank

    @classmethod
    def from_hub(
        cls,
        repo_ids_by_task: dict[str, list[str] | str],
        conditions: dict[str, torch.Tensor] | None = None,
        descriptions: dict[str, str] | None = None,
        condition_encoder: dict | None = None,
        library: str | None = None,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
    ) -> "LoraBank":
        """Build a bank from PEFT adapter repos on the Hub: `{task: ["user/adapter", ...] or "user/adapter"}`.

        Only `adapter_config.json` and `adapter_model.safetensors` of each repo are downloaded (to the Hugging Face
        cache), then the bank is built as by `from_adapters` (`library="diffusers"` marks adapters of a diffusers
        UNet); one checkpoint per task is enough. `revision` applies to every repo. A missing repo, revision or file
        raises `MissingFileError` naming the repo.
        """
        if not repo_ids_by_task or not any(repo_ids_by_task.values()):
            raise EmptyBankError("No repos were given. Pass {task name: [Hub repo id, ...]} with at least one.")
        folders = {}
        for task, repo_ids in repo_ids_by_task.items():
            folders[task] = []
            for repo_id in [repo_ids] if isinstance(repo_ids, str) else repo_ids:
                folder = _download_from_hub(
                    repo_id,
                    repo_type="model",
                    files=list(ADAPTER_FILES),
                    what="a PEFT LoRA adapter",
                    revision=revision,
                    token=token,
                )
                for name in ADAPTER_FILES:
                    if not (folder / name).is_file():
                        raise MissingFileError(
                            f"The Hub repo {repo_id!r} has no {name}, so it is not a PEFT adapter saved as "
                            "safetensors. Push adapters with `PeftModel.push_to_hub` (safetensors is the default)."
                        )
                folders[task].append(folder)
        return cls.from_adapters(folders, conditions, descriptions, condition_encoder, library)

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
                sha256 = sha256_file(staging / file)  # checked on load: safetensors has no checksum of its own
                entries.append({"task": checkpoint.task, "step": checkpoint.step, "file": file, "sha256": sha256})
            if self._conditions:
                write_safetensors(self._conditions, staging / CONDITIONS_NAME)
            manifest = {
                "format_version": BANK_FORMAT_VERSION,
                "layout": self.layout.to_dict(),
                "condition_encoder": self.condition_encoder,
                "tasks": [{"name": task, "description": self.description(task)} for task in self.task_names],
                "checkpoints": entries,
            }
            if self._conditions:
                manifest["conditions_sha256"] = sha256_file(staging / CONDITIONS_NAME)
            write_json(manifest, staging / BANK_MANIFEST_NAME)

    def dataset_card(self, repo_id: str | None = None) -> DatasetCard:
        """The README.md of the bank's Hub dataset repo: YAML metadata, the tasks and how to load the bank."""
        config = self.layout.lora_config
        base_model = config.get("base_model_name_or_path")
        tasks = self.task_names
        shown = ", ".join(tasks[:5]) + (f" and {len(tasks) - 5} more" if len(tasks) > 5 else "")
        metadata = DatasetCardData(
            pretty_name=f"LoRA bank: {shown}" if tasks else "LoRA bank",
            tags=["peft-cvae", "lora-bank", "lora", "peft"],
            size_categories="n<1K" if len(self) < 1000 else "1K<n<10K",
            peft_cvae={
                "tasks": tasks,
                "checkpoints": len(self),
                "base_model": base_model,
                "r": config.get("r"),
                "lora_alpha": config.get("lora_alpha"),
                "target_modules": config.get("target_modules"),
                "parameters_per_checkpoint": self.layout.numel,
            },
        )
        rows = "\n".join(
            f"| {task} | {len(self.checkpoints_of(task))} | "
            f"{', '.join(str(c.step) for c in self.checkpoints_of(task) if c.step is not None) or '-'} | "
            f"{self.description(task).replace('|', '/')} |"
            for task in tasks
        )
        content = f"""---
{metadata.to_yaml()}
---

# LoRA bank

{len(self)} LoRA checkpoints of {f"`{base_model}`" if base_model else "one base model (not named in its LoRA config)"}
for {len(tasks)} task(s), collected to train a [peft-cvae](https://pypi.org/project/peft-cvae/) LoRA generator: rank
{config.get("r")}, alpha {config.get("lora_alpha")}, target modules {config.get("target_modules")},
{self.layout.numel:,} parameters per checkpoint. Every file is safetensors or JSON; `bank.json` lists the checkpoints.

| task | checkpoints | steps | description |
|---|---|---|---|
{rows}

## Use

```python
from peft_cvae import LoraBank, PeftCVAEGenerator, train_generator

bank = LoraBank.from_pretrained("{repo_id or "<this repo>"}")
generator = PeftCVAEGenerator.from_bank(bank)
train_generator(generator, bank)
```
"""
        return DatasetCard(content)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
    ):
        """Upload the bank as a Hub **dataset** repo (the `save_pretrained` folder plus a README.md dataset card).

        Checkpoint files left in the repo by an earlier, larger push are deleted in the same commit. Load the bank
        back with `LoraBank.from_pretrained(repo_id)`. Returns huggingface_hub's `CommitInfo`.
        """
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory(prefix="peft-cvae-bank-") as folder:
            self.save_pretrained(folder)
            self.dataset_card(repo_id).save(Path(folder) / "README.md")
            return api.upload_folder(
                repo_id=repo_id,
                repo_type="dataset",
                folder_path=folder,
                revision=revision,
                commit_message=commit_message or f"Upload LoRA bank ({len(self)} checkpoints) with peft-cvae",
                delete_patterns=["checkpoints/*.safetensors"],
            )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
    ) -> "LoraBank":
        """Load a bank written by `save_pretrained`: a local folder, or a Hub dataset repo id pushed by `push_to_hub`.

        A string that is not an existing folder but a valid repo id (`"user/my-bank"`) is downloaded from the Hub
        (only the manifest and safetensors files; `revision` and `token` apply to it). A `pathlib.Path` is always
        local.
        """
        root = None  # every checkpoint file must resolve (symlinks followed) to a path inside this folder
        if isinstance(directory, str) and not Path(directory).exists() and _is_repo_id(directory):
            directory = _download_from_hub(
                directory,
                repo_type="dataset",
                files=BANK_FILE_PATTERNS,
                what="a LoRA bank pushed with LoraBank.push_to_hub",
                revision=revision,
                token=token,
            )
            # in the Hugging Face cache, snapshots/<commit>/<file> is a symlink to blobs/<hash> of the same repo folder
            root = directory.parent.parent
        directory = Path(directory)
        root = (root or directory).resolve()
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
        _check_manifest_entries(manifest, directory / BANK_MANIFEST_NAME)
        bank = cls(LoraLayout.from_dict(manifest["layout"]), condition_encoder=manifest.get("condition_encoder"))
        for entry in manifest["checkpoints"]:
            relative = Path(entry["file"])
            path = directory / relative
            if relative.is_absolute() or ".." in relative.parts or root not in path.resolve().parents:
                raise CorruptFileError(
                    f"The bank manifest points outside the bank folder: {entry['file']!r}; expected a path inside it "
                    "such as 'checkpoints/00000.safetensors'. Do not load this bank: it may try to read other files."
                )
            if not path.is_file():
                raise MissingFileError(
                    f"The bank manifest lists {entry['file']} but {path} does not exist. The bank folder is "
                    "incomplete: copy or download all of it again."
                )
            _check_sha256(path, entry.get("sha256"), "bank checkpoint")
            state_dict = read_safetensors(path, what="bank checkpoint")
            dtypes = sorted({str(tensor.dtype).removeprefix("torch.") for tensor in state_dict.values()})
            if dtypes and dtypes != [bank.layout.dtype]:
                raise CorruptFileError(
                    f"The bank checkpoint {path} holds tensors of dtype {dtypes} but the bank's layout says "
                    f"{bank.layout.dtype}. The file is corrupted or from another bank: save the bank again."
                )
            bank.add_checkpoint(entry["task"], state_dict, entry.get("step"))
        descriptions = {task["name"]: task.get("description", "") for task in manifest["tasks"]}
        if (directory / CONDITIONS_NAME).exists():
            _check_sha256(directory / CONDITIONS_NAME, manifest.get("conditions_sha256"), "bank conditions file")
            for task, condition in read_safetensors(directory / CONDITIONS_NAME, what="bank conditions").items():
                bank.set_condition(task, condition)
        bank._descriptions.update({task: text for task, text in descriptions.items() if text})
        return bank


def _is_repo_id(name: str) -> bool:
    """Whether `name` reads as a Hub repo id (`name` or `namespace/name`) rather than a path."""
    if name.count("/") > 1 or name.startswith((".", "/", "~")) or "\\" in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True
