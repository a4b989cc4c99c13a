"""`train_generator`: fit a `PeftCVAEGenerator` to a `LoraBank` with accelerate: distributed, resumable, deterministic.

The same loop runs on one CPU, one GPU or many processes (`accelerate launch`, `torchrun`, `debug_launcher`):
accelerate shards every global batch across the processes, averages gradients, handles mixed precision ("no", "bf16",
"fp16") and gradient accumulation, and reports to its trackers (tensorboard, wandb, ...) when `log_with` is set.

Determinism, whatever the number of processes
---------------------------------------------
* Data order: `EpochShuffleSampler` draws each epoch's permutation from `seed + epoch` alone. Every process iterates
  the same permutation and accelerate hands each one its slice of every global batch, so a run on P processes with
  `batch_size` b sees exactly the global batches of a 1-process run with batch size P x b.
* Reparameterisation noise: drawn from one CPU `torch.Generator` seeded with `seed`, for the whole global batch at
  every step; each process takes the rows of its own samples. The noise of a sample is therefore the same on 1 or on
  P processes, and the generator's state is one small tensor to checkpoint.
* Together: the same seed gives bit-identical weights on CPU for one process, and a resumed run is bit-identical to
  an uninterrupted one. Across different process counts results agree to floating-point rounding (gradients are
  averaged in another order).

Checkpoints: safetensors and JSON only
--------------------------------------
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
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader, Sampler, TensorDataset
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .errors import CorruptFileError, InvalidConfigError, MissingFileError
from .file_utils import atomic_directory, read_json, read_safetensors, write_json, write_safetensors

__all__ = ["EpochShuffleSampler", "latest_checkpoint", "train_generator"]

logger = logging.getLogger(__name__)

CHECKPOINTS_FOLDER = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-epoch-"
MODEL_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_STATE_NAME = "rng_state.safetensors"
TRAINER_STATE_NAME = "trainer_state.json"
HISTORY_NAME = "training_history.json"
CHECKPOINT_FILES = (MODEL_NAME, OPTIMIZER_NAME, RNG_STATE_NAME, TRAINER_STATE_NAME)
CHECKPOINT_FORMAT_VERSION = 1
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


class EpochShuffleSampler(Sampler[int]):
    """Yields a permutation of `range(num_samples)` that depends only on `seed + epoch`.

    accelerate calls `set_epoch` through the prepared DataLoader, and every process computes the same permutation, so
    the global batches are the same on any number of processes and after a resume.
    """

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return iter(order.tolist())


def train_generator(
    generator,
    bank,
    *,
    epochs: int = 300,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.05,
    max_grad_norm: float | None = 1.0,
    gradient_accumulation_steps: int = 1,
    mixed_precision: str | None = None,
    accelerator: Accelerator | None = None,
    log_with: str | list[str] | None = None,
    project_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    output_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep_last_checkpoints: int | None = None,
    resume_from: str | os.PathLike | None = None,
) -> list[dict]:
    """Train `generator` on the checkpoints of `bank` and return one record of mean losses per epoch.

    Args:
        generator: a `PeftCVAEGenerator`, usually from `PeftCVAEGenerator.from_bank(bank)`; trained in place.
        bank: the `LoraBank` whose checkpoints (and task conditions) are the training data.
        epochs: passes over the bank.
        lr: peak learning rate of AdamW; a linear warm-up over `warmup_ratio` of the steps, then cosine decay to 0.
        batch_size: checkpoints per batch *per process*; the global batch is `batch_size x num_processes`.
        seed: seeds data order, initialisation noise and the reparameterisation noise. The same seed gives
            bit-identical weights on CPU (one process), also across a kill and resume.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping norm (None: no clipping).
        gradient_accumulation_steps: passed to `accelerate.Accelerator` when `accelerator` is not given, as are the
            next three.
        mixed_precision: "no", "bf16" or "fp16". `accelerate launch --mixed_precision bf16` also works: an explicit
            argument here wins over the launcher's setting only when it is not None.
        log_with: accelerate trackers ("tensorboard", "wandb", ..., "all").
        project_dir: where trackers write; defaults to `output_dir`.
        accelerator: an `Accelerator` of your own (then the four arguments above are ignored).
        show_progress: show a progress bar (main process only).
        output_dir: where checkpoints (`output_dir/checkpoints/checkpoint-epoch-NNNNNN/`) go and, at the end, the
            trained generator (`save_pretrained`) and `training_history.json` (main process only).
        checkpoint_every: save a resumable checkpoint every this many epochs (needs `output_dir`).
        keep_last_checkpoints: delete all but the newest this many checkpoints (None keeps all).
        resume_from: a checkpoint folder, or "latest" for the newest complete checkpoint in `output_dir` (a fresh
            start when there is none yet, so the same command can be re-run after every interruption). The run
            continues at the epoch after the checkpoint with the same data order and noise; the arguments listed in
            `RESUME_MUST_MATCH` (and the bank) must equal those of the interrupted run.

    Returns:
        `[{"epoch": 1, "loss": ..., "reconstruction_loss": ..., "kl_loss": ..., "lr": ...}, ...]`, averaged over all
        batches of the epoch and all processes; a resumed run returns the whole history, restored epochs included.

    Raises:
        InvalidConfigError: bad arguments, a fresh start into an `output_dir` that already holds checkpoints, a
            checkpoint of another run, or checkpointing under DeepSpeed/FSDP.
        MissingFileError, CorruptFileError: `resume_from` is missing, incomplete or unreadable.
    """
    _check_arguments(
        epochs,
        batch_size,
        gradient_accumulation_steps,
        output_dir,
        checkpoint_every,
        keep_last_checkpoints,
        resume_from,
    )
    output_dir = Path(output_dir) if output_dir is not None else None
    resume_path = _resolve_resume(resume_from, output_dir)
    if resume_path is None and output_dir is not None and checkpoint_every and latest_checkpoint(output_dir):
        raise InvalidConfigError(
            f"{output_dir / CHECKPOINTS_FOLDER} already holds training checkpoints (newest: "
            f"{latest_checkpoint(output_dir).name}), and a fresh run would mix its checkpoints with theirs. Pass "
            "resume_from='latest' (CLI: --resume latest) to continue that run, or choose another output_dir (or "
            "delete the old one)."
        )
    if accelerator is None:
        accelerator = Accelerator(
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=gradient_accumulation_steps,
            log_with=log_with,
            project_dir=project_dir if project_dir is not None else output_dir,
        )
    if (checkpoint_every or resume_from) and accelerator.distributed_type in (
        DistributedType.DEEPSPEED,
        DistributedType.FSDP,
        DistributedType.MEGATRON_LM,
    ):
        raise InvalidConfigError(
            f"Resumable checkpoints are not supported under {accelerator.distributed_type.value}: its optimizer state "
            "is sharded across processes and peft-cvae's safetensors checkpoints do not gather it. The generator is "
            "small enough for plain data parallelism: launch without a DeepSpeed/FSDP config (DDP), or drop "
            "checkpoint_every / resume_from."
        )

    set_seed(seed)
    dataset = TensorDataset(bank.vectors(), bank.checkpoint_conditions())  # (K, N), (K, cond)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=EpochShuffleSampler(len(dataset), seed))
    optimizer = torch.optim.AdamW(generator.parameters(), lr=lr, weight_decay=weight_decay)
    model, optimizer, loader = accelerator.prepare(generator, optimizer, loader)
    # The schedule counts optimizer steps of the global batch, so its state means the same on any number of
    # processes (a prepared scheduler would step once per process) and a run can resume on another process count.
    steps_per_epoch = math.ceil(len(loader) / accelerator.gradient_accumulation_steps)  # len: this process's share
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(warmup_ratio * epochs * steps_per_epoch), epochs * steps_per_epoch
    )
    noise_generator = torch.Generator().manual_seed(seed)  # reparameterisation noise, identical on every process
    # Process r holds rows r * b ... (r + 1) * b - 1 of every global batch of b * P checkpoints (b = per process).
    per_process_batch = batch_size // accelerator.num_processes if accelerator.split_batches else batch_size
    global_batch_size = per_process_batch * accelerator.num_processes
    run = {
        "seed": seed,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "num_processes": accelerator.num_processes,
        "global_batch_size": global_batch_size,
        "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
        "weight_decay": weight_decay,
        "warmup_ratio": warmup_ratio,
        "max_grad_norm": max_grad_norm,
        "mixed_precision": str(accelerator.mixed_precision),
        "bank_fingerprint": _fingerprint(dataset.tensors),
    }

    history, start_epoch = [], 0
    if resume_path is not None:
        state = _load_checkpoint(
            resume_path, run, generator, optimizer, scheduler, accelerator.scaler, noise_generator
        )
        history, start_epoch = state["history"], state["epoch"]
        logger.info("Resumed from %s: %d of %d epochs done.", resume_path, start_epoch, epochs)

    if accelerator.log_with:
        accelerator.init_trackers("peft-cvae", config={k: v for k, v in run.items() if v is not None})
    model.train()
    progress = tqdm(
        total=epochs,
        initial=start_epoch,
        desc="training generator",
        disable=not (show_progress and accelerator.is_main_process),
    )
    latent_size = generator.config.latent_size
    rank = accelerator.process_index
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)  # -> EpochShuffleSampler.set_epoch: this epoch's permutation
        totals = torch.zeros(3, device=accelerator.device)  # summed loss, reconstruction, kl over batches
        for params, condition in loader:
            # Noise for the whole global batch, drawn on every process; this process takes its own samples' rows.
            noise = torch.randn(global_batch_size, latent_size, generator=noise_generator)
            first = rank * per_process_batch
            noise = noise[first : first + params.shape[0]].to(accelerator.device)
            with accelerator.accumulate(model):
                output = model(params, condition, noise=noise)
                accelerator.backward(output.loss)
                if max_grad_norm is not None and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()  # a no-op between accumulation steps
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad()
            totals += torch.stack([output.loss, output.reconstruction_loss, output.kl_loss]).detach().float()
        totals = accelerator.reduce(totals / len(loader), reduction="mean")
        record = {
            "epoch": epoch + 1,
            "loss": totals[0].item(),
            "reconstruction_loss": totals[1].item(),
            "kl_loss": totals[2].item(),
            "lr": scheduler.get_last_lr()[0],
        }
        history.append(record)
        accelerator.log({key: value for key, value in record.items() if key != "epoch"}, step=epoch + 1)
        progress.update()
        progress.set_postfix(loss=f"{record['loss']:.4f}", recon=f"{record['reconstruction_loss']:.4f}")
        if checkpoint_every and (epoch + 1) % checkpoint_every == 0:
            if accelerator.is_main_process:
                _save_checkpoint(
                    output_dir / CHECKPOINTS_FOLDER / f"{CHECKPOINT_PREFIX}{epoch + 1:06d}",
                    state_dict=accelerator.get_state_dict(model),
                    optimizer=optimizer,
                    scheduler=scheduler,
                    scaler=accelerator.scaler,
                    noise_generator=noise_generator,
                    epoch=epoch + 1,
                    history=history,
                    run=run,
                )
                _prune_checkpoints(output_dir, keep_last_checkpoints)
            accelerator.wait_for_everyone()
    progress.close()

    model.eval()
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # takes the autocast wrapper off generator.forward
    generator.training_history = history  # save_pretrained / push_to_hub put its summary in the model card
    if output_dir is not None:
        sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        state_dict = accelerator.get_state_dict(model) if sharded else None  # gathered from all processes
        if accelerator.is_main_process:
            generator.save_pretrained(output_dir, **({"state_dict": state_dict} if sharded else {}))
            write_json({"history": history, "run": run}, output_dir / HISTORY_NAME)
        accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.free_memory()
    return history


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest *complete* checkpoint folder under `output_dir/checkpoints`, or None.

    A folder missing one of its files (a run killed while it was being written) is skipped.
    """
    folder = Path(output_dir) / CHECKPOINTS_FOLDER
    if not folder.is_dir():
        return None
    complete = [path for path in folder.glob(f"{CHECKPOINT_PREFIX}*") if _is_complete(path)]
    return max(complete, key=_checkpoint_epoch, default=None)


# ---- arguments ------------------------------------------------------------------------------------------------------
def _check_arguments(
    epochs, batch_size, gradient_accumulation_steps, output_dir, checkpoint_every, keep_last_checkpoints, resume_from
):
    if epochs < 1 or batch_size < 1 or gradient_accumulation_steps < 1:
        raise ValueError(
            f"epochs, batch_size and gradient_accumulation_steps must be >= 1, got epochs={epochs}, "
            f"batch_size={batch_size}, gradient_accumulation_steps={gradient_accumulation_steps}."
        )
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise InvalidConfigError(f"checkpoint_every must be a positive number of epochs, got {checkpoint_every!r}.")
    if keep_last_checkpoints is not None and (not isinstance(keep_last_checkpoints, int) or keep_last_checkpoints < 1):
        raise InvalidConfigError(
            f"keep_last_checkpoints must be a positive number or None (keep all), got {keep_last_checkpoints!r}."
        )
    if checkpoint_every and output_dir is None:
        raise InvalidConfigError(
            f"checkpoint_every={checkpoint_every} needs output_dir= to know where to write the checkpoints."
        )
    if resume_from == "latest" and output_dir is None:
        raise InvalidConfigError("resume_from='latest' looks in output_dir/checkpoints; pass output_dir= as well.")


def _resolve_resume(resume_from, output_dir: Path | None) -> Path | None:
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


def _check_same_run(saved: dict, current: dict, path: Path) -> None:
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


def _fingerprint(tensors) -> str:
    """A short hash of the training data, to tell a checkpoint of another bank apart."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def _checkpoint_epoch(path: Path) -> int:
    suffix = path.name[len(CHECKPOINT_PREFIX) :]
    return int(suffix) if suffix.isdigit() else -1


def _has_all_files(path: Path) -> bool:
    return all((path / name).is_file() for name in CHECKPOINT_FILES)


def _is_complete(path: Path) -> bool:
    return _checkpoint_epoch(path) >= 0 and _has_all_files(path)


def _prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    if keep is None:
        return
    folders = sorted((output_dir / CHECKPOINTS_FOLDER).glob(f"{CHECKPOINT_PREFIX}*"), key=_checkpoint_epoch)
    for old in folders[: max(len(folders) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def _save_checkpoint(directory, *, state_dict, optimizer, scheduler, scaler, noise_generator, epoch, history, run):
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


def _load_checkpoint(directory: Path, run: dict, generator, optimizer, scheduler, scaler, noise_generator) -> dict:
    """Restore everything `_save_checkpoint` wrote into live objects; returns the trainer state.

    Every file is read and checked before anything is restored, so a checkpoint of another run or a damaged one
    raises without touching the generator or the optimizer.
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
    _check_same_run(trainer_state["run"], run, directory)

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
