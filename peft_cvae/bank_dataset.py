"""`BankDataset`: a torch `Dataset` over a `LoraBank`'s checkpoints, read one by one when a batch asks for them.

`train_generator` feeds the generator through it and a `DataLoader`, so the bank is never in memory as a whole: a
batch is read (memory-mapped, checked on first read: `peft_cvae.bank_files`) while the previous one trains when the
loader has worker processes (`GeneratorTrainingArguments.dataloader_num_workers`), and memory holds a few batches,
whatever the bank's size. A bank built in memory works the same way, from memory.
"""

import torch
from torch.utils.data import Dataset

from .errors import InvalidConfigError

__all__ = ["BankDataset", "check_task_indices"]


class BankDataset(Dataset):
    """Item `i` is `(flat vector (N,) float32, condition of its task (cond,), index of its task ())` of the bank's
    checkpoint `i`.

    The task index (int64, position in `bank.task_names`, which is the order of a generator's task memory built by
    `from_bank`) identifies a checkpoint's own task exactly, whatever the conditions: two tasks may share a
    condition vector. Training with `memory_holdout` uses it to hide the own task from the task memory.

    The conditions (one small vector per checkpoint) are gathered at construction; the vectors are read on demand.
    Worker processes get a copy of the bank's manifest (forked or pickled), never of its tensors.
    """

    def __init__(self, bank):
        self.bank = bank
        self.conditions = bank.checkpoint_conditions()  # (K, cond): raises if a task has no condition
        rows = {task: row for row, task in enumerate(bank.task_names)}
        self.task_indices = torch.tensor([rows[checkpoint.task] for checkpoint in bank.checkpoints])  # (K,) int64

    def __len__(self) -> int:
        return len(self.bank)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.bank.vector(index), self.conditions[index], self.task_indices[index]


def check_task_indices(config, bank) -> None:
    """With `memory_holdout` > 0 a sample's own task is hidden by its index in `bank.task_names`, which must then be
    the generator's task memory row: the same tasks in the same order, and at least two (one is always left)."""
    if config.memory_holdout == 0:
        return
    if list(config.task_names) != bank.task_names:
        raise InvalidConfigError(
            f"memory_holdout={config.memory_holdout} hides each checkpoint's own task from the task memory by its "
            f"position, but the generator's tasks {list(config.task_names)[:5]} are not the bank's "
            f"{bank.task_names[:5]} (same names, same order). Train on the bank the generator was built from "
            "(PeftCVAEGenerator.from_bank(bank, ...))."
        )
    if len(bank.task_names) < 2:
        raise InvalidConfigError(
            f"memory_holdout={config.memory_holdout} needs at least 2 tasks in the bank (the task memory must keep "
            f"one task when a sample's own task is hidden); this bank has {len(bank.task_names)}. Add tasks or set "
            "memory_holdout=0."
        )
