"""`BankDataset`: a torch `Dataset` over a `LoraBank`'s checkpoints, read one by one when a batch asks for them.

`train_generator` feeds the generator through it and a `DataLoader`, so the bank is never in memory as a whole: a
batch is read (memory-mapped, checked on first read: `peft_cvae.bank_files`) while the previous one trains when the
loader has worker processes (`GeneratorTrainingArguments.dataloader_num_workers`), and memory holds a few batches,
whatever the bank's size. A bank built in memory works the same way, from memory.
"""

import torch
from torch.utils.data import Dataset

__all__ = ["BankDataset"]


class BankDataset(Dataset):
    """Item `i` is `(flat vector (N,) float32, condition of its task (cond,))` of the bank's checkpoint `i`.

    The conditions (one small vector per checkpoint) are gathered at construction; the vectors are read on demand.
    Worker processes get a copy of the bank's manifest (forked or pickled), never of its tensors.
    """

    def __init__(self, bank):
        self.bank = bank
        self.conditions = bank.checkpoint_conditions()  # (K, cond): raises if a task has no condition

    def __len__(self) -> int:
        return len(self.bank)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bank.vector(index), self.conditions[index]
