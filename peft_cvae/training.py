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

Resumable checkpoints (safetensors and JSON only, never pickle) are written and read by `peft_cvae.checkpointing`;
the defaults of every argument live in `peft_cvae.training_args.GeneratorTrainingArguments`.
"""

import dataclasses
import logging
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .bank_dataset import BankDataset, check_task_indices
from .checkpointing import (
    BANK_FINGERPRINT_FORMAT,
    CHECKPOINTS_FOLDER,
    checkpoint_path,
    latest_checkpoint,
    legacy_fingerprint,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from .errors import InvalidConfigError, NonFiniteError
from .file_utils import write_json
from .training_args import GeneratorTrainingArguments

__all__ = [
    "EarlyStopping",
    "EpochShuffleSampler",
    "GeneratorTrainingArguments",
    "latest_checkpoint",
    "train_generator",
]

logger = logging.getLogger(__name__)

HISTORY_NAME = "training_history.json"


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
    args: GeneratorTrainingArguments | None = None,
    *,
    accelerator: Accelerator | None = None,
    functional_loss=None,
    **kwargs,
) -> list[dict]:
    """Train `generator` on the checkpoints of `bank` and return one record of mean losses per epoch.

    Args:
        generator: a `PeftCVAEGenerator`, usually from `PeftCVAEGenerator.from_bank(bank)`; trained in place.
        bank: the `LoraBank` whose checkpoints (and task conditions) are the training data.
        args: a `GeneratorTrainingArguments` (epochs, lr, batch size, seed, early stopping, output and resuming; its
            field docs are the reference). Default: `GeneratorTrainingArguments()`.
        accelerator: an `Accelerator` of your own (then `mixed_precision`, `gradient_accumulation_steps`,
            `log_with` and `project_dir` are ignored).
        functional_loss: a `peft_cvae.functional_loss.FunctionalLoss`: adds `functional_loss.weight` x the answer NLL
            of each decoded (sampled) LoRA on a few of its task's training examples to the loss, and records the
            epoch's mean NLL as `functional_loss` in the history. None (default): the CVAE loss alone.
        **kwargs: fields of `GeneratorTrainingArguments` (`train_generator(g, bank, epochs=50, lr=1e-3)`), which
            override those of `args`.

    The same seed gives bit-identical weights on CPU (one process), also across a kill and resume with
    `resume_from`; the arguments listed in `peft_cvae.checkpointing.RESUME_MUST_MATCH` (and the bank) must then equal
    those of the interrupted run. Training stops early when the epoch loss has not improved for
    `early_stopping_patience` epochs; the history then ends there and `training_history.json` says so.

    Returns:
        `[{"epoch": 1, "loss": ..., "reconstruction_loss": ..., "kl_loss": ..., "lr": ...}, ...]`, averaged over all
        batches of the epoch and all processes; a resumed run returns the whole history, restored epochs included.

    Raises:
        InvalidConfigError: bad arguments, a fresh start into an `output_dir` that already holds checkpoints, a
            checkpoint of another run, or checkpointing under DeepSpeed/FSDP.
        MissingFileError, CorruptFileError: `resume_from` is missing, incomplete or unreadable.
        NonFiniteError: the loss became NaN or infinite (training diverged); nothing more is written.
    """
    args = _resolve_arguments(args, kwargs)
    output_dir = Path(args.output_dir) if args.output_dir is not None else None
    resume_path = resolve_resume(args.resume_from, output_dir)
    if resume_path is None and output_dir is not None and args.checkpoint_every and latest_checkpoint(output_dir):
        raise InvalidConfigError(
            f"{output_dir / CHECKPOINTS_FOLDER} already holds training checkpoints (newest: "
            f"{latest_checkpoint(output_dir).name}), and a fresh run would mix its checkpoints with theirs. Pass "
            "resume_from='latest' (CLI: --resume latest) to continue that run, or choose another output_dir (or "
            "delete the old one)."
        )
    if accelerator is None:
        accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with=args.log_with,
            project_dir=args.project_dir if args.project_dir is not None else output_dir,
        )
    _check_distributed(accelerator, args)

    offset = getattr(generator, "functional_offset", None)
    offset_trainable = offset is not None and offset.requires_grad
    try:
        loop = _Loop.prepare(generator, bank, args, accelerator, functional_loss)
        history, start_epoch = [], 0
        if resume_path is not None:
            state = load_checkpoint(
                resume_path,
                loop.run,
                generator,
                loop.optimizer,
                loop.scheduler,
                accelerator.scaler,
                loop.noise_generator,
                legacy_bank_fingerprint=lambda: legacy_fingerprint(bank),
            )
            history, start_epoch = state["history"], state["epoch"]
            logger.info("Resumed from %s: %d of %d epochs done.", resume_path, start_epoch, args.epochs)
        if accelerator.log_with:
            accelerator.init_trackers("peft-cvae", config={k: v for k, v in loop.run.items() if v is not None})
        stopper = EarlyStopping(args.early_stopping_patience, args.early_stopping_min_delta, history)
        progress = tqdm(
            total=args.epochs,
            initial=start_epoch,
            desc="training generator",
            disable=not (args.show_progress and accelerator.is_main_process),
        )
        loop.model.train()
        for epoch in range(start_epoch if not stopper.stopped else args.epochs, args.epochs):
            record = loop.train_epoch(epoch)
            if not math.isfinite(record["loss"]):
                progress.close()
                accelerator.end_training()
                raise NonFiniteError(
                    f"Training diverged: the loss of epoch {epoch + 1} is {record['loss']} (it was "
                    f"{history[-1]['loss'] if history else 'not measured yet'} the epoch before). Nothing was "
                    f"written. Lower the learning rate (lr={args.lr}) or keep gradient clipping on (max_grad_norm)."
                )
            history.append(record)
            accelerator.log({key: value for key, value in record.items() if key != "epoch"}, step=epoch + 1)
            progress.update()
            progress.set_postfix(loss=f"{record['loss']:.4f}", recon=f"{record['reconstruction_loss']:.4f}")
            stop = stopper.update(record)
            if args.checkpoint_every and ((epoch + 1) % args.checkpoint_every == 0 or stop):
                loop.save_checkpoint(output_dir, epoch + 1, history, args.keep_last_checkpoints)
            if stop:
                logger.info("Early stopping after epoch %d: %s", epoch + 1, stopper.summary())
                break
        progress.close()
        _finish(loop, history, stopper, output_dir)
        return history
    finally:  # training decides whether the offset learns (see _Loop.prepare); the generator is left as it came
        if offset is not None:
            offset.requires_grad_(offset_trainable)


def _resolve_arguments(args: GeneratorTrainingArguments | None, kwargs: dict) -> GeneratorTrainingArguments:
    """`args` with `kwargs` applied (checked by `GeneratorTrainingArguments.__post_init__`)."""
    known = {field.name for field in dataclasses.fields(GeneratorTrainingArguments)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(
            f"train_generator() got unexpected keyword arguments {unknown}; the arguments are the fields of "
            f"GeneratorTrainingArguments: {sorted(known)}."
        )
    if args is None:
        return GeneratorTrainingArguments(**kwargs)
    if not isinstance(args, GeneratorTrainingArguments):
        raise InvalidConfigError(f"args must be a GeneratorTrainingArguments, got a {type(args).__name__}.")
    return dataclasses.replace(args, **kwargs) if kwargs else args


def _loader_options(args: GeneratorTrainingArguments, accelerator: Accelerator) -> dict:
    """DataLoader keywords from the arguments: workers that stay alive across epochs (they keep the bank's checked
    files, `peft_cvae.bank_files`), read-ahead, and pinned memory where there is a GPU to copy to."""
    options = {
        "num_workers": args.dataloader_num_workers,
        "pin_memory": args.dataloader_pin_memory and accelerator.device.type == "cuda",
        "persistent_workers": args.dataloader_num_workers > 0,
    }
    if args.dataloader_prefetch_factor is not None:
        options["prefetch_factor"] = args.dataloader_prefetch_factor
    return options


def _check_distributed(accelerator: Accelerator, args: GeneratorTrainingArguments) -> None:
    if (args.checkpoint_every or args.resume_from) and accelerator.distributed_type in (
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


class EarlyStopping:
    """Stop when the epoch loss has not improved by more than `min_delta` (relative) for `patience` epochs.

    Its state is a function of the history alone, so a resumed run stops where the uninterrupted one would.
    """

    def __init__(self, patience: int | None, min_delta: float, history: list[dict] = ()):
        self.patience = patience
        self.min_delta = min_delta
        self.best_loss = math.inf
        self.best_epoch = 0
        self.stopped_epoch = None
        for record in history:
            self.update(record)

    @property
    def stopped(self) -> bool:
        return self.stopped_epoch is not None

    def update(self, record: dict) -> bool:
        """Take one epoch's record; True when training should stop after it (and after every later one)."""
        if self.stopped:
            return True
        threshold = self.best_loss - self.min_delta * abs(self.best_loss)
        if not math.isfinite(self.best_loss) or record["loss"] < threshold:
            self.best_loss, self.best_epoch = record["loss"], record["epoch"]
        elif self.patience and record["epoch"] - self.best_epoch >= self.patience:
            self.stopped_epoch = record["epoch"]
        return self.stopped

    def summary(self) -> dict:
        return {
            "patience": self.patience,
            "min_delta": self.min_delta,
            "stopped_epoch": self.stopped_epoch,
            "best_epoch": self.best_epoch,
            "best_loss": self.best_loss if math.isfinite(self.best_loss) else None,
        }


@dataclasses.dataclass
class _Loop:
    """The prepared objects of one training run and the steps of its loop."""

    args: GeneratorTrainingArguments
    accelerator: Accelerator
    generator: torch.nn.Module
    model: torch.nn.Module  # the generator as prepared by accelerate (DDP, autocast, ...)
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    scheduler: object
    noise_generator: torch.Generator
    per_process_batch: int
    global_batch_size: int
    run: dict
    task_names: list[str]  # the bank's: a batch's task index (BankDataset) is a position in this list
    functional_loss: object = None  # a FunctionalLoss, or None

    @classmethod
    def prepare(
        cls, generator, bank, args: GeneratorTrainingArguments, accelerator: Accelerator, functional_loss=None
    ) -> "_Loop":
        set_seed(args.seed)
        bank.condition_size  # noqa: B018  (raises EmptyBankError for a bank of fewer than 2 checkpoints)
        check_task_indices(generator.config, bank)
        dataset = BankDataset(bank)  # items (N,), (cond,): read from the bank one by one, never all at once
        loader = DataLoader(
            dataset,
            batch_size=args.batch_size,
            sampler=EpochShuffleSampler(len(dataset), args.seed),
            **_loader_options(args, accelerator),
        )
        if getattr(generator, "functional_offset", None) is not None:
            # only a functional loss trains it; without one it gets no gradient, which data-parallel training refuses
            generator.functional_offset.requires_grad_(functional_loss is not None)
        optimizer = torch.optim.AdamW(
            _parameter_groups(generator, args, functional_loss), weight_decay=args.weight_decay
        )
        model, optimizer, loader = accelerator.prepare(generator, optimizer, loader)
        # The schedule counts optimizer steps of the global batch, so its state means the same on any number of
        # processes (a prepared scheduler would step once per process) and a run can resume on another process count.
        steps_per_epoch = math.ceil(len(loader) / accelerator.gradient_accumulation_steps)  # this process's share
        total_steps = args.epochs * steps_per_epoch
        scheduler = get_cosine_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)
        # Process r holds rows r * b ... (r + 1) * b - 1 of every global batch of b * P checkpoints (b = per process).
        per_process_batch = (
            args.batch_size // accelerator.num_processes if accelerator.split_batches else args.batch_size
        )
        global_batch_size = per_process_batch * accelerator.num_processes
        run = {
            "seed": args.seed,
            "epochs": args.epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "num_processes": accelerator.num_processes,
            "global_batch_size": global_batch_size,
            "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
            "weight_decay": args.weight_decay,
            "warmup_ratio": args.warmup_ratio,
            "max_grad_norm": args.max_grad_norm,
            "mixed_precision": str(accelerator.mixed_precision),
            "early_stopping_patience": args.early_stopping_patience,
            "early_stopping_min_delta": args.early_stopping_min_delta,
            "bank_fingerprint": bank.fingerprint(),  # from the recorded file hashes: no pass over the data
            "bank_fingerprint_format": BANK_FINGERPRINT_FORMAT,
        }
        noise_generator = torch.Generator().manual_seed(args.seed)  # reparameterisation noise, same on every process
        if functional_loss is not None:
            functional_loss.check_generator(generator)
            functional_loss.to(accelerator.device)
            run.update(functional_loss.settings())
        return cls(
            args, accelerator, generator, model, optimizer, loader, scheduler, noise_generator, per_process_batch,
            global_batch_size, run, bank.task_names, functional_loss,
        )  # fmt: skip

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the bank; the epoch's mean losses, averaged over all processes."""
        accelerator, model = self.accelerator, self.model
        self.loader.set_epoch(epoch)  # -> EpochShuffleSampler.set_epoch: this epoch's permutation
        latent_size = self.generator.config.latent_size
        first = accelerator.process_index * self.per_process_batch
        totals = torch.zeros(4, device=accelerator.device)  # summed loss, reconstruction, kl, functional over batches
        holdout = self.generator.config.memory_holdout
        for batch_index, (params, condition, task) in enumerate(self.loader):
            # Noise for the whole global batch, drawn on every process; this process takes its own samples' rows.
            noise = torch.randn(self.global_batch_size, latent_size, generator=self.noise_generator)
            noise = noise[first : first + params.shape[0]].to(accelerator.device)
            hidden = None
            if holdout > 0:  # leave-one-task-out: hide each sample's own task from the memory with this probability
                draw = torch.rand(self.global_batch_size, generator=self.noise_generator)[first : first + len(task)]
                hidden = torch.where(draw < holdout, task.cpu(), -1).to(accelerator.device)  # (b,), -1: none hidden
            on_generated = self.functional_loss is not None and self.functional_loss.on_generated
            with accelerator.accumulate(model):
                output = model(params, condition, noise=noise, hidden_tasks=hidden, return_generated=on_generated)
                loss, functional = output.loss, torch.zeros((), device=accelerator.device)
                if self.functional_loss is not None:  # the decoded LoRAs on the frozen base model
                    if on_generated:  # what generation writes for the condition
                        scored = output.generated
                    elif output.offset_reconstruction is not None:  # the reconstruction, with the offset
                        scored = output.offset_reconstruction
                    else:
                        scored = output.reconstruction
                    functional = self._functional(scored, task, epoch, batch_index, first)
                    loss = loss + self.functional_loss.weight * functional
                accelerator.backward(loss)
                if self.args.max_grad_norm is not None and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
                self.optimizer.step()  # a no-op between accumulation steps
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    self.scheduler.step()
                self.optimizer.zero_grad()
            totals += torch.stack([loss, output.reconstruction_loss, output.kl_loss, functional]).detach().float()
        totals = accelerator.reduce(totals / len(self.loader), reduction="mean")
        record = {
            "epoch": epoch + 1,
            "loss": totals[0].item(),
            "reconstruction_loss": totals[1].item(),
            "kl_loss": totals[2].item(),
            "lr": self.scheduler.get_last_lr()[0],
        }
        if self.functional_loss is not None:
            record["functional_loss"] = totals[3].item()
        return record

    def _functional(self, decoded, task, epoch: int, batch_index: int, first: int) -> torch.Tensor:
        """The functional loss of a batch's decoded LoRAs (normalised, (B, N)); each sample's task is the bank task
        at its index `task` (B,), its examples drawn from (epoch, batch, row in the global batch)."""
        tasks = [self.task_names[index] for index in task.tolist()]
        vectors = self.generator.denormalize(decoded)  # (B, N) raw flat LoRA vectors (canonical form if set)
        step = epoch * len(self.loader) + batch_index
        return self.functional_loss(vectors, tasks, step=step, first_row=first)

    def save_checkpoint(self, output_dir: Path, epoch: int, history: list[dict], keep_last: int | None) -> None:
        """A resumable checkpoint after `epoch` epochs (main process), then the oldest pruned."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            save_checkpoint(
                checkpoint_path(output_dir, epoch),
                state_dict=accelerator.get_state_dict(self.model),
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=accelerator.scaler,
                noise_generator=self.noise_generator,
                epoch=epoch,
                history=history,
                run=self.run,
            )
            prune_checkpoints(output_dir, keep_last)
        accelerator.wait_for_everyone()


def _parameter_groups(generator, args: GeneratorTrainingArguments, functional_loss) -> list[dict]:
    """AdamW's parameter groups: everything at `args.lr`, except a functional offset (raw LoRA units) at the
    functional loss's `offset_lr` when it sets one."""
    offset = getattr(generator, "functional_offset", None)
    offset_lr = None if functional_loss is None else functional_loss.offset_lr
    if offset is None or offset_lr is None:
        return [{"params": list(generator.parameters()), "lr": args.lr}]
    others = [parameter for parameter in generator.parameters() if parameter is not offset]
    return [{"params": others, "lr": args.lr}, {"params": [offset], "lr": offset_lr}]


def _finish(loop: _Loop, history: list[dict], stopper: EarlyStopping, output_dir: Path | None) -> None:
    """Put the generator in eval mode and, with `output_dir`, save it and its history (main process only)."""
    accelerator, generator = loop.accelerator, loop.generator
    loop.model.eval()
    accelerator.unwrap_model(loop.model, keep_fp32_wrapper=False)  # takes the autocast wrapper off generator.forward
    generator.training_history = history  # save_pretrained / push_to_hub put its summary in the model card
    if output_dir is not None:
        sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        state_dict = accelerator.get_state_dict(loop.model) if sharded else None  # gathered from all processes
        if accelerator.is_main_process:
            generator.save_pretrained(output_dir, **({"state_dict": state_dict} if sharded else {}))
            record = {"history": history, "run": loop.run, "early_stopping": stopper.summary()}
            write_json(record, output_dir / HISTORY_NAME)
        accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.free_memory()
