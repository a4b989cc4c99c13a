"""`LoraBank`: the training data of a generator — LoRA checkpoints of one base model, grouped by task.

A bank holds, in order, (task, step, state dict) checkpoints that all share one `LoraLayout`, and one condition vector
(plus an optional description) per task. It is saved as a folder:

    bank.json                    manifest: format version, layout, tasks, checkpoints (task, step, file)
    conditions.safetensors       one condition vector per task, keyed by task name
    checkpoints/00000.safetensors   one PEFT state dict per checkpoint (the same tensors as adapter_model.safetensors)
    peft_cvae_integrity.json     the sha256 of each file above, written last (banks saved before it: in bank.json)

Nothing is pickled; every file is JSON or safetensors (integrity: `peft_cvae.integrity`).

Size of this file (~580 lines, over the ~400 guideline): one class, building (from checkpoints, adapter folders or Hub
repos), reading (whole, per checkpoint, in chunks, as statistics) and saving a bank; the shared pieces (adapter
reading, Hub download and push, integrity, the lazily read checkpoint files) live in `adapter_io.py`, `hub.py`,
`integrity.py` and `bank_files.py`.
"""

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub import DatasetCard, DatasetCardData

from .adapter_io import adapter_library, load_adapter
from .bank_files import CheckpointFiles, LoraCheckpoint
from .constants import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    BANK_CHECKPOINTS_FOLDER,
    BANK_FORMAT_VERSION,
    BANK_MANIFEST_NAME,
    CARD_NAME,
    CONDITIONS_NAME,
    INTEGRITY_NAME,
)
from .errors import (
    ConditionError,
    CorruptFileError,
    EmptyBankError,
    MissingFileError,
    UnknownTaskError,
)
from .file_utils import atomic_directory, folder_lock, write_json, write_safetensors
from .hub import download_from_hub, is_repo_id, push_folder_to_hub
from .integrity import VerifiedFolder, write_integrity_record
from .layout import LoraLayout, RunningStatistics
from .task_data import check_task_name

__all__ = ["BANK_MANIFEST_NAME", "LoraBank", "LoraCheckpoint"]

ADAPTER_FILES = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)  # all that is read of a PEFT adapter repo, with the record
# all a bank repo holds that is loaded
BANK_FILE_PATTERNS = [BANK_MANIFEST_NAME, CONDITIONS_NAME, f"{BANK_CHECKPOINTS_FOLDER}/*.safetensors", INTEGRITY_NAME]
BANK_CARD_TEMPLATE = Path(__file__).parent / "templates" / "bank_card.md"
DEFAULT_CHUNK_BYTES = 64 * 2**20  # rows `iter_vectors` reads at once when no chunk size is given


def check_manifest(manifest, where: Path) -> None:
    """Raise `CorruptFileError` unless `manifest` is a bank manifest this peft-cvae can read: its fields, its format
    version and its task and checkpoint entries (`LoraBank.from_pretrained` and `peft-cvae info` both ask)."""
    if not isinstance(manifest, dict):
        raise CorruptFileError(f"The bank manifest {where} is not a JSON object. Save the bank again.")
    for name, kind in (("format_version", int), ("layout", dict), ("tasks", list), ("checkpoints", list)):
        if not isinstance(manifest.get(name), kind):
            raise CorruptFileError(
                f"The bank manifest {where} lacks a valid {name!r} field (expected a {kind.__name__}). Save the bank "
                "again with LoraBank.save_pretrained."
            )
    if manifest["format_version"] > BANK_FORMAT_VERSION:
        raise CorruptFileError(
            f"The bank was written in format {manifest['format_version']}, newer than this peft-cvae understands "
            f"({BANK_FORMAT_VERSION}). Upgrade peft-cvae."
        )
    _check_manifest_entries(manifest, where)


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
        check_task_name(task)  # names become folder and Hub path components: refuse "../x", "/abs", "", " ", NUL
        self.layout.flatten(state_dict)  # checks layout and finiteness, raising a clear error
        # Stored in the layout's dtype, as every checkpoint file of the bank must be: a float32 checkpoint in a float16
        # bank is cast (as PEFT casts an adapter to the model's dtype) instead of failing when the bank is loaded.
        dtype = self.layout.torch_dtype
        state_dict = {key: state_dict[key].detach().cpu().to(dtype).clone() for key in self.layout.keys}
        self.layout.flatten(state_dict)  # a value beyond the range of the layout's dtype is refused here, not at load
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
        unet_config=None,
    ) -> "LoraBank":
        """Build a bank from saved PEFT adapters: `{task: [adapter folder or Hub repo id, ...]}`.

        The layout is taken from the first adapter; every other one must match it (same base model, rank and target
        modules) and have the same LoRA config. Diffusion LoRAs are read too and give `layout.library ==
        "diffusers"`: local diffusers LoRA folders (`pytorch_lora_weights.safetensors`) and `.safetensors` files in
        diffusers or Kohya/A1111 format, converted by diffusers (alphas carried as in
        `peft_cvae.diffusers_lora_files`; `unet_config=pipe.unet.config` for Kohya SDXL files). Pass
        `library="diffusers"` for PEFT folders of a diffusers UNet (`PeftModel.save_pretrained`), so generated
        adapters are also written for `pipe.load_lora_weights`.
        """
        if not adapters or not any(adapters.values()):
            raise EmptyBankError("No adapters were given. Pass {task name: [adapter folder, ...]} with at least one.")
        bank = None
        for task, paths in adapters.items():
            for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
                config, state_dict = load_adapter(path, unet_config=unet_config)
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
                folder = download_from_hub(
                    repo_id,
                    repo_type="model",
                    files=[*ADAPTER_FILES, INTEGRITY_NAME],  # the record only where peft-cvae wrote the adapter
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
        """Flat vectors of all checkpoints, in order. Shape (K, N).

        This loads the whole bank into one float32 tensor: fine for small banks, not for one larger than memory. Walk
        a large bank with `vector(i)` or `iter_vectors(chunk_size)` instead (what `from_bank` and `train_generator`
        do).
        """
        self._check_trainable()
        return torch.stack([self.vector(index) for index in range(len(self))])

    def vector(self, index: int) -> torch.Tensor:
        """The flat float32 vector of checkpoint `index`, read from its file for a bank on disk. Shape (N,)."""
        return self.layout.flatten(self.checkpoints[index].state_dict)

    def iter_vectors(self, chunk_size: int | None = None, indices=None) -> Iterator[torch.Tensor]:
        """Yield the flat vectors of the checkpoints (all, or `indices` in that order) in chunks of `chunk_size` rows,
        each a (<= chunk_size, N) float32 tensor: memory holds one chunk, whatever the bank's size.

        `chunk_size=None` picks as many rows as fit in `DEFAULT_CHUNK_BYTES` (at least one).
        """
        indices = range(len(self)) if indices is None else list(indices)
        chunk_size = chunk_size or max(1, DEFAULT_CHUNK_BYTES // (4 * self.layout.numel))
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
        for start in range(0, len(indices), chunk_size):
            yield torch.stack([self.vector(index) for index in indices[start : start + chunk_size]])

    def statistics(
        self, *, chunk_size: int | None = None, task_means: bool = False, transform=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Normalisation statistics of the bank in one pass over its checkpoints, chunk by chunk.

        Returns `offset` (N,) and `scale` (num_tensors,) as `LoraLayout.statistics(bank.vectors())` would (see
        `RunningStatistics`: float64 accumulators of size N, never a copy of the bank), and with `task_means=True`
        the mean raw vector of each task in `task_names` order (T, N) float32, else None. `transform` maps each chunk
        (B, N) -> (B, N) before it is counted (the generator's canonical form: statistics of what the network sees).
        """
        self._check_trainable()
        running = RunningStatistics(self.layout)
        means = torch.zeros(len(self.task_names), self.layout.numel) if task_means else None  # (T, N)
        for row, task in enumerate(self.task_names):
            indices = [index for index, checkpoint in enumerate(self.checkpoints) if checkpoint.task == task]
            total = torch.zeros(self.layout.numel, dtype=torch.float64) if task_means else None  # (N,)
            for chunk in self.iter_vectors(chunk_size, indices):  # (B, N)
                if transform is not None:
                    chunk = transform(chunk)
                running.update(chunk)
                if total is not None:
                    total += chunk.double().sum(dim=0)
            if means is not None:
                means[row] = (total / len(indices)).float()
        offset, scale = running.result()
        return offset, scale, means

    def fingerprint(self) -> str:
        """A short hash that tells this bank's training data apart from any other's, computed from the checkpoints'
        recorded file hashes, steps and tasks and the conditions, without reading the checkpoints (for a bank on
        disk). A bank in memory and the same bank saved and loaded again have the same fingerprint."""
        digest = hashlib.sha256(json.dumps(self.layout.to_dict(), sort_keys=True).encode())
        for checkpoint in self.checkpoints:
            digest.update(json.dumps([checkpoint.task, checkpoint.step, checkpoint.sha256]).encode())
        conditions = self.condition_matrix()  # (T, cond)
        digest.update(str(tuple(conditions.shape)).encode() + conditions.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def verify(self) -> None:
        """Read every checkpoint once now (one at a time) and check it: its sha256 against the bank's record and its
        values for NaN/Inf. A bank on disk is otherwise checked lazily, file by file, on first read; this raises
        what a later read would (`CorruptFileError`, `MissingFileError`, `NonFiniteError`) at once."""
        for checkpoint in self.checkpoints:
            if checkpoint.on_disk:
                checkpoint.state_dict  # noqa: B018  (the read checks it)

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
        """Write the bank folder (manifest, conditions, one safetensors file per checkpoint, and last the integrity
        record that lists the sha256 of each of them), atomically."""
        with atomic_directory(save_directory) as staging:
            self._write(staging)

    def _write(self, folder: Path) -> None:
        entries = []
        (folder / BANK_CHECKPOINTS_FOLDER).mkdir()
        for index, checkpoint in enumerate(self.checkpoints):
            file = f"{BANK_CHECKPOINTS_FOLDER}/{index:05d}.safetensors"
            write_safetensors(checkpoint.state_dict, folder / file)
            entries.append({"task": checkpoint.task, "step": checkpoint.step, "file": file})
        if self._conditions:
            write_safetensors(self._conditions, folder / CONDITIONS_NAME)
        manifest = {
            "format_version": BANK_FORMAT_VERSION,
            "layout": self.layout.to_dict(),
            "condition_encoder": self.condition_encoder,
            "tasks": [{"name": task, "description": self.description(task)} for task in self.task_names],
            "checkpoints": entries,
        }
        write_json(manifest, folder / BANK_MANIFEST_NAME)
        write_integrity_record(folder)  # last: covers the manifest, the conditions and every checkpoint

    def dataset_card(self, repo_id: str | None = None) -> DatasetCard:
        """The README.md of the bank's Hub dataset repo (`templates/bank_card.md`): YAML metadata, the tasks and how
        to load the bank."""
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
        rows = [
            {
                "name": task,
                "checkpoints": len(self.checkpoints_of(task)),
                "steps": ", ".join(str(c.step) for c in self.checkpoints_of(task) if c.step is not None) or "-",
                "description": self.description(task).replace("|", "/"),
            }
            for task in tasks
        ]
        return DatasetCard.from_template(
            metadata,
            template_path=str(BANK_CARD_TEMPLATE),
            repo_id=repo_id or "<this repo>",
            num_checkpoints=len(self),
            base_model=base_model,
            tasks=rows,
            rank=config.get("r"),
            lora_alpha=config.get("lora_alpha"),
            target_modules=config.get("target_modules"),
            parameters=self.layout.numel,
        )

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

        def save(folder: Path, full_repo_id: str) -> None:
            self.save_pretrained(folder)
            self.dataset_card(full_repo_id).save(folder / CARD_NAME)

        return push_folder_to_hub(
            save,
            repo_id,
            repo_type="dataset",
            private=private,
            token=token,
            revision=revision,
            commit_message=commit_message or f"Upload LoRA bank ({len(self)} checkpoints) with peft-cvae",
            delete_patterns=[f"{BANK_CHECKPOINTS_FOLDER}/*.safetensors"],
        )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        verify: bool = False,
    ) -> "LoraBank":
        """Open a bank written by `save_pretrained`: a local folder, or a Hub dataset repo id pushed by `push_to_hub`.

        A string that is not an existing folder but a valid repo id (`"user/my-bank"`) is downloaded from the Hub
        (only the manifest and safetensors files; `revision` and `token` apply to it). A `pathlib.Path` is always
        local.

        Only the manifest and the conditions are read into memory (each checked against the bank's integrity record,
        or for banks saved before it, against the sha256 their manifest recorded). Of each checkpoint file only the
        header is read now (its dtype, keys and shapes must fit the layout); its tensors are read when asked for,
        memory-mapped, and its hash and values are checked on that first read (`peft_cvae.bank_files`), so a bank
        larger than memory opens in the time of reading its headers. `verify=True` checks every checkpoint at once
        instead (`LoraBank.verify`: each file read once, one at a time).
        """
        root = None  # every checkpoint file must resolve (symlinks followed) to a path inside this folder
        if isinstance(directory, str) and not Path(directory).exists() and is_repo_id(directory):
            directory = download_from_hub(
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
        with folder_lock(directory):
            bank = cls._read(VerifiedFolder(directory, what="bank"), (root or directory).resolve())
            if verify:
                bank.verify()
        return bank

    @classmethod
    def _read(cls, files: VerifiedFolder, root: Path) -> "LoraBank":
        directory = files.folder
        manifest = files.read_json(BANK_MANIFEST_NAME, what="bank manifest")
        check_manifest(manifest, directory / BANK_MANIFEST_NAME)
        bank = cls(LoraLayout.from_dict(manifest["layout"]), condition_encoder=manifest.get("condition_encoder"))
        checkpoint_files = CheckpointFiles(files, bank.layout)
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
            check_task_name(entry["task"])
            name = relative.as_posix()
            checkpoint_files.check_header(name, entry.get("sha256"))  # the header only; data is read when asked for
            bank.checkpoints.append(
                LoraCheckpoint(
                    entry["task"],
                    step=entry.get("step"),
                    file=name,
                    files=checkpoint_files,
                    sha256=entry.get("sha256"),
                )
            )
        descriptions = {task["name"]: task.get("description", "") for task in manifest["tasks"]}
        if manifest.get("conditions_sha256") is not None and not files.exists(CONDITIONS_NAME):
            raise MissingFileError(
                f"The bank manifest {directory / BANK_MANIFEST_NAME} records {CONDITIONS_NAME}, but the file is "
                "missing: the bank folder is incomplete. Copy or download all of it again."
            )
        if files.exists(CONDITIONS_NAME):
            conditions = files.read_safetensors(
                CONDITIONS_NAME, what="bank conditions file", expected_sha256=manifest.get("conditions_sha256")
            )
            for task, condition in conditions.items():
                bank.set_condition(task, condition)
        bank._descriptions.update({task: text for task, text in descriptions.items() if text})
        return bank
