"""`GeneratorTrainingArguments`: the single source of `train_generator`'s defaults (and of `peft-cvae train`'s flags).

Like trl's `*Config` dataclasses: every field carries its help text in `field(metadata={"help": ...})`, so the command
line (`transformers.HfArgumentParser`), config files and `train_generator`'s keyword arguments all agree.
"""

import math
from dataclasses import dataclass, field

from .errors import InvalidConfigError

__all__ = ["GeneratorTrainingArguments"]

MIXED_PRECISIONS = ("no", "fp16", "bf16")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class GeneratorTrainingArguments:
    """How `train_generator` fits a `PeftCVAEGenerator` to a `LoraBank` (optimiser, schedule, output, resuming)."""

    # 300 stays the cap: measured on a 30-checkpoint bank, 100 epochs left the loss at 0.25 against 0.007 after 300
    # (2 optimiser steps per epoch); early stopping, not a lower cap, is what ends a run once the loss is flat.
    epochs: int = field(
        default=300, metadata={"help": "passes over the bank at most (early stopping ends sooner on a plateau)"}
    )
    lr: float = field(
        default=1e-3, metadata={"help": "peak learning rate of AdamW; linear warm-up, then cosine decay to 0"}
    )
    batch_size: int = field(
        default=16, metadata={"help": "checkpoints per batch per process (global batch: x number of processes)"}
    )
    seed: int = field(
        default=0,
        metadata={"help": "seeds data order, initialisation and reparameterisation noise (bit-identical on CPU)"},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of the steps spent warming up the lr"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "gradient clipping norm (None: no clipping)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches per optimiser step"})
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "accelerate mixed precision (default: the launcher's setting, else no)",
            "choices": list(MIXED_PRECISIONS),
        },
    )
    log_with: str | None = field(
        default=None, metadata={"help": "accelerate tracker(s), e.g. tensorboard, wandb or all"}
    )
    project_dir: str | None = field(default=None, metadata={"help": "tracker log folder (default: output_dir)"})
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "where the trained generator, training_history.json and checkpoints/ are written",
            "aliases": ["--output"],
        },
    )
    checkpoint_every: int | None = field(
        default=None,
        metadata={"help": "save a resumable training state every N epochs, under OUTPUT/checkpoints/"},
    )
    keep_last_checkpoints: int | None = field(
        default=None, metadata={"help": "keep only the newest N resumable checkpoints (default: all)"}
    )
    resume_from: str | None = field(
        default=None,
        metadata={
            "help": "continue an interrupted run from a checkpoint folder, or from the newest one in "
            "OUTPUT/checkpoints/ ('latest'; a fresh start when there is none yet)",
            "metavar": "CHECKPOINT|latest",
            "aliases": ["--resume"],
        },
    )
    # 10 epochs and 1 %: the epoch loss of a plateaued run wanders by 5-10 % from epoch to epoch, so with 0.1 % and 20
    # epochs (the defaults before) noise kept setting new bests: 110 epochs on a 6-task x 7-checkpoint SmolLM2 bank
    # whose reconstruction loss was flat from epoch 1, 22 epochs (6.5 min) on a 4 x 40 bank flat from epoch 2.
    early_stopping_patience: int | None = field(
        default=10,
        metadata={"help": "stop when the epoch loss has not improved for this many epochs (0 or None: never)"},
    )
    early_stopping_min_delta: float = field(
        default=0.01, metadata={"help": "the smallest relative fall of the loss that counts as an improvement"}
    )
    show_progress: bool = field(default=True, metadata={"help": "show a progress bar (main process only)"})
    # Names as in transformers.TrainingArguments. The bank is read checkpoint by checkpoint (BankDataset); workers read
    # the next batches while a step trains, which matters when reading a batch takes as long as a step (large LoRAs).
    dataloader_num_workers: int = field(
        default=0,
        metadata={
            "help": "processes that read bank checkpoints ahead of the training step (0: read in the training "
            "process, between steps); each holds up to dataloader_prefetch_factor batches"
        },
    )
    dataloader_prefetch_factor: int | None = field(
        default=None,
        metadata={"help": "batches each data-loader worker reads ahead (default: torch's, 2; needs workers)"},
    )
    dataloader_pin_memory: bool = field(
        default=True,
        metadata={"help": "read batches into pinned memory for faster copies to a GPU (ignored on CPU)"},
    )

    def __post_init__(self):
        for name in ("epochs", "batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise InvalidConfigError(f"{name} must be a positive integer, got {value!r}.")
        if (
            isinstance(self.dataloader_num_workers, bool)
            or not isinstance(self.dataloader_num_workers, int)
            or self.dataloader_num_workers < 0
        ):
            raise InvalidConfigError(
                f"dataloader_num_workers must be an integer >= 0, got {self.dataloader_num_workers!r}."
            )
        if self.dataloader_prefetch_factor is not None and (
            not _is_positive_int(self.dataloader_prefetch_factor) or self.dataloader_num_workers == 0
        ):
            raise InvalidConfigError(
                f"dataloader_prefetch_factor={self.dataloader_prefetch_factor!r}: expected a positive integer, "
                "together with dataloader_num_workers >= 1 (without workers nothing is read ahead), or None."
            )
        for name in ("checkpoint_every", "keep_last_checkpoints"):
            value = getattr(self, name)
            if value is not None and not _is_positive_int(value):
                raise InvalidConfigError(
                    f"{name} must be a positive number of {'epochs' if name == 'checkpoint_every' else 'checkpoints'} "
                    f"or None, got {value!r}."
                )
        if self.early_stopping_patience is not None and (
            isinstance(self.early_stopping_patience, bool)
            or not isinstance(self.early_stopping_patience, int)
            or self.early_stopping_patience < 0
        ):
            raise InvalidConfigError(
                f"early_stopping_patience must be an epoch count >= 0 or None, got {self.early_stopping_patience!r}."
            )
        if not _is_finite_number(self.early_stopping_min_delta) or not 0 <= self.early_stopping_min_delta < 1:
            raise InvalidConfigError(
                f"early_stopping_min_delta must be in [0, 1), got {self.early_stopping_min_delta!r}."
            )
        if not _is_finite_number(self.lr) or self.lr <= 0:
            raise InvalidConfigError(f"lr must be a positive number, got {self.lr!r}.")
        if not _is_finite_number(self.weight_decay) or self.weight_decay < 0:
            raise InvalidConfigError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}.")
        if not _is_finite_number(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            raise InvalidConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}.")
        if self.max_grad_norm is not None and (not _is_finite_number(self.max_grad_norm) or self.max_grad_norm <= 0):
            raise InvalidConfigError(f"max_grad_norm must be a positive number or None, got {self.max_grad_norm!r}.")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISIONS:
            raise InvalidConfigError(
                f"mixed_precision must be one of {MIXED_PRECISIONS} or None, got {self.mixed_precision!r}."
            )
        if self.checkpoint_every and self.output_dir is None:
            raise InvalidConfigError(
                f"checkpoint_every={self.checkpoint_every} needs output_dir= to know where to write the checkpoints."
            )
        if self.resume_from == "latest" and self.output_dir is None:
            raise InvalidConfigError("resume_from='latest' looks in output_dir/checkpoints; pass output_dir= as well.")


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
