"""Resumable training checkpoints of `train_generator`: safetensors and JSON only.

`accelerate.Accelerator.save_state` writes the model as safetensors but the optimizer, scheduler, sampler and RNG
states with `torch.save` (`optimizer.bin`, `scheduler.bin`, `random_states_0.pkl`: Python object serialisation, which
can run code when read back). peft-cvae loads files it may not have written itself, so it writes its own checkpoint
folder, every file of which is safetensors or JSON:

    <output_dir>/checkpoints/checkpoint-epoch-000010/
        model.safetensors       the generator's state dict (parameters and normalisation buffers)
        optimizer.safetensors   every tensor of `optimizer.state_dict()["state"]`, keyed "state.<param id>.<name>"
        rng_state.safetensors   the noise generator, torch's CPU (and CUDA) generators, numpy's key, as tensors
        trainer_state.json      epoch, history, run arguments, optimizer param_groups, scheduler and grad-scaler
                                state dicts, python's `random` state and the rest of numpy's

`optimizer.state_dict()` is exactly tensors (moments, step counts) plus JSON-able hyper-parameters, and the
scheduler's state dict is numbers (the lambda of `get_cosine_schedule_with_warmup` is rebuilt from code), so the split
is lossless and loading needs no unpickling at all. Checkpoints are taken at epoch boundaries; because automatic
checkpoint naming of accelerate is not used, its `project_configuration.iteration` bookkeeping does not apply.
Sharded optimizers (DeepSpeed, FSDP) keep per-rank optimizer state that this format does not gather, so checkpointing
is refused there with a clear error; training and the final save work (see docs/distributed.md).
"""

import hashlib
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import CorruptFileError, InvalidConfigError, MissingFileError
from .file_utils import atomic_directory, read_json, read_safetensors, write_json, write_safetensors

__all__ = [
    "BANK_FINGERPRINT_FORMAT",
    "CHECKPOINTS_FOLDER",
    "CHECKPOINT_PREFIX",
    "checkpoint_path",
    "legacy_fingerprint",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "resolve_resume",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINTS_FOLDER = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-epoch-"
MODEL_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_STATE_NAME = "rng_state.safetensors"
TRAINER_STATE_NAME = "trainer_state.json"
CHECKPOINT_FILES = (MODEL_NAME, OPTIMIZER_NAME, RNG_STATE_NAME, TRAINER_STATE_NAME)
CHECKPOINT_FORMAT_VERSION = 1
# How `run["bank_fingerprint"]` was computed: absent = a hash of the bank's data (before banks were streamed),
# 2 = `LoraBank.fingerprint()`, from the checkpoints' recorded file hashes.
BANK_FINGERPRINT_FORMAT = 2
# Run arguments that must be equal for a resumed run to continue the interrupted one exactly.
RESUME_MUST_MATCH = (
    "seed",
    "epochs",
    "lr",
    "global_batch_size",
    "gradient_accumulation_steps",
    "weight_decay",
    "warmup_ratio",
    "max_grad_norm",
    "bank_fingerprint",
)


def checkpoint_path(output_dir: str | os.PathLike, epoch: int) -> Path:
    """The folder of the checkpoint taken after `epoch` epochs."""
    return Path(output_dir) / CHECKPOINTS_FOLDER / f"{CHECKPOINT_PREFIX}{epoch:06d}"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest *complete* checkpoint folder under `output_dir/checkpoints`, or None.

    A folder missing one of its files (a run killed while it was being written) is skipped.
    """
    folder = Path(output_dir) / CHECKPOINTS_FOLDER
    if not folder.is_dir():
        return None
    complete = [path for path in folder.glob(f"{CHECKPOINT_PREFIX}*") if _is_complete(path)]
    return max(complete, key=_checkpoint_epoch, default=None)


def resolve_resume(resume_from, output_dir: Path | None) -> Path | None:
    """The checkpoint folder `resume_from` names ("latest": the newest complete one, None if there is none yet)."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            logger.info("No checkpoint in %s yet: starting from scratch.", output_dir / CHECKPOINTS_FOLDER)
        return path
    path = Path(resume_from)
    if not path.is_dir():
        raise MissingFileError(
            f"resume_from={str(resume_from)!r} is not a folder. Expected a checkpoint folder "
            f"({CHECKPOINT_PREFIX}NNNNNN under output_dir/{CHECKPOINTS_FOLDER}) or 'latest'."
        )
    if not _has_all_files(path):
        missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
        raise MissingFileError(
            f"The checkpoint {path} is incomplete: {', '.join(missing)} missing (expected "
            f"{', '.join(CHECKPOINT_FILES)}). It was probably being written when the run died; resume from an "
            "older checkpoint or with 'latest'."
        )
    return path


def _check_same_run(saved: dict, current: dict, path: Path, legacy_bank_fingerprint=None) -> None:
    if saved.get("bank_fingerprint_format") != current.get("bank_fingerprint_format") and legacy_bank_fingerprint:
        # A checkpoint written before banks were streamed hashed the bank's data (see `legacy_fingerprint`): compare
        # that, computed once by streaming the bank, and the checkpoint resumes as before.
        if saved.get("bank_fingerprint") == legacy_bank_fingerprint():
            saved = {**saved, "bank_fingerprint": current["bank_fingerprint"]}
    differences = [
        f"{key}: checkpoint {saved.get(key)!r}, now {current[key]!r}"
        for key in RESUME_MUST_MATCH
        if saved.get(key) != current[key]
    ]
    if differences:
        raise InvalidConfigError(
            f"The checkpoint {path} belongs to another run ({'; '.join(differences)}). Resume with the same bank and "
            "training arguments (batch_size x processes must give the same global batch), or start a new run in "
            "another output_dir."
        )


def legacy_fingerprint(bank) -> str:
    """The bank fingerprint of checkpoints written before banks were streamed: a hash of the (K, N) float32 matrix of
    the bank's vectors and the (K, cond) conditions, here computed chunk by chunk (the same bytes in the same order),
    so an old run still resumes without holding the bank in memory."""
    digest = hashlib.sha256(str((len(bank), bank.layout.numel)).encode())
    for chunk in bank.iter_vectors():  # (B, N)
        digest.update(chunk.contiguous().view(torch.uint8).numpy().tobytes())
    conditions = bank.checkpoint_conditions()  # (K, cond)
    digest.update(str(tuple(conditions.shape)).encode())
    digest.update(conditions.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def _checkpoint_epoch(path: Path) -> int:
    suffix = path.name[len(CHECKPOINT_PREFIX) :]
    return int(suffix) if suffix.isdigit() else -1


def _has_all_files(path: Path) -> bool:
    return all((path / name).is_file() for name in CHECKPOINT_FILES)


def _is_complete(path: Path) -> bool:
    return _checkpoint_epoch(path) >= 0 and _has_all_files(path)


def prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    """Delete all but the newest `keep` checkpoint folders (None keeps all)."""
    if keep is None:
        return
    folders = sorted((output_dir / CHECKPOINTS_FOLDER).glob(f"{CHECKPOINT_PREFIX}*"), key=_checkpoint_epoch)
    for old in folders[: max(len(folders) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(directory, *, state_dict, optimizer, scheduler, scaler, noise_generator, epoch, history, run):
    """Write one resumable checkpoint (safetensors + JSON only), atomically."""
    optimizer_state = optimizer.state_dict()
    optimizer_tensors, optimizer_other = {}, {}
    for param_id, param_state in optimizer_state["state"].items():  # {param id: {"step", "exp_avg", ...}}
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                optimizer_tensors[f"state.{param_id}.{name}"] = value.detach().cpu()
            else:
                optimizer_other.setdefault(str(param_id), {})[name] = value
    rng_tensors = {"noise_generator": noise_generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng_tensors.update({f"torch_cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    numpy_kind, numpy_key, numpy_position, numpy_has_gauss, numpy_gauss = np.random.get_state()
    rng_tensors["numpy_key"] = torch.from_numpy(numpy_key.astype(np.int64))
    python_version, python_internal, python_gauss = random.getstate()
    trainer_state = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "epoch": epoch,
        "history": history,
        "run": run,
        "optimizer": {"param_groups": optimizer_state["param_groups"], "non_tensor_state": optimizer_other},
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": {
            "python": [python_version, list(python_internal), python_gauss],
            "numpy": [numpy_kind, int(numpy_position), int(numpy_has_gauss), float(numpy_gauss)],
        },
    }
    with atomic_directory(directory) as staging:
        write_safetensors({key: value.detach().cpu() for key, value in state_dict.items()}, staging / MODEL_NAME)
        write_safetensors(optimizer_tensors, staging / OPTIMIZER_NAME)
        write_safetensors(rng_tensors, staging / RNG_STATE_NAME)
        write_json(trainer_state, staging / TRAINER_STATE_NAME)


def load_checkpoint(
    directory: Path, run: dict, generator, optimizer, scheduler, scaler, noise_generator, legacy_bank_fingerprint=None
) -> dict:
    """Restore everything `save_checkpoint` wrote into live objects; returns the trainer state.

    Every file is read and checked before anything is restored, so a checkpoint of another run or a damaged one
    raises without touching the generator or the optimizer. `legacy_bank_fingerprint` (a callable) gives the bank's
    fingerprint as checkpoints written before `BANK_FINGERPRINT_FORMAT` computed it, for those.
    """
    trainer_state = read_json(directory / TRAINER_STATE_NAME, what="trainer state")
    if trainer_state.get("format_version") != CHECKPOINT_FORMAT_VERSION or not all(
        key in trainer_state for key in ("epoch", "history", "run", "optimizer", "scheduler", "rng")
    ):
        raise CorruptFileError(
            f"{directory / TRAINER_STATE_NAME} is not a peft-cvae trainer state of format {CHECKPOINT_FORMAT_VERSION} "
            "(fields missing or another version). Resume from a checkpoint written by this version of peft-cvae."
        )
    if not isinstance(trainer_state["run"], dict):
        raise CorruptFileError(f"{directory / TRAINER_STATE_NAME} has no valid 'run' record; the file is damaged.")
    _check_same_run(trainer_state["run"], run, directory, legacy_bank_fingerprint)

    model_state = read_safetensors(directory / MODEL_NAME, what="checkpoint model weights")
    expected = {key: tuple(value.shape) for key, value in generator.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in model_state.items()}
    if found != expected:
        differing = sorted(set(found) ^ set(expected)) or [key for key in expected if found[key] != expected[key]]
        raise InvalidConfigError(
            f"The checkpoint {directory} holds weights of another generator (keys or shapes differ: "
            f"{', '.join(differing[:5])}). Resume with the generator configuration of the interrupted run."
        )
    optimizer_tensors = read_safetensors(directory / OPTIMIZER_NAME, what="checkpoint optimizer state")
    rng = read_safetensors(directory / RNG_STATE_NAME, what="checkpoint RNG state")
    try:
        saved = trainer_state["optimizer"]
        state = {int(param_id): dict(values) for param_id, values in saved["non_tensor_state"].items()}
        for key, value in optimizer_tensors.items():
            _, param_id, name = key.split(".", 2)
            # A copy in memory of our own: load_state_dict keeps a tensor of the right dtype and device as it is.
            state.setdefault(int(param_id), {})[name] = value.clone()
        groups = saved["param_groups"]
        for group, current in zip(groups, optimizer.param_groups, strict=True):  # JSON made tuples (betas) lists
            for key, value in group.items():
                if isinstance(current.get(key), tuple):
                    group[key] = tuple(value)
        numpy_kind, numpy_position, numpy_has_gauss, numpy_gauss = trainer_state["rng"]["numpy"]
        numpy_state = (numpy_kind, rng["numpy_key"].numpy().astype(np.uint32), numpy_position, numpy_has_gauss)
        python_version, python_internal, python_gauss = trainer_state["rng"]["python"]

        # Objects of this call first; the generator (already checked to fit) and the global generators last.
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        scheduler.load_state_dict(trainer_state["scheduler"])
        if scaler is not None and trainer_state.get("scaler") is not None:
            scaler.load_state_dict(trainer_state["scaler"])
        noise_generator.set_state(rng["noise_generator"])
        generator.load_state_dict(model_state)
        torch.set_rng_state(rng["torch_cpu"])
        np.random.set_state((*numpy_state, numpy_gauss))
        random.setstate((python_version, tuple(python_internal), python_gauss))
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as error:
        raise CorruptFileError(
            f"The checkpoint {directory} is damaged: its optimizer, scheduler or RNG state cannot be restored "
            f"({type(error).__name__}: {error}). Resume from another checkpoint."
        ) from error
    if torch.cuda.is_available():
        cuda_states = [rng[key] for key in sorted(rng) if key.startswith("torch_cuda.")]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    return trainer_state
