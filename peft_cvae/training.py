"""`train_generator`: fit a `PeftCVAEGenerator` to a `LoraBank` with accelerate.

The same loop runs on one CPU, one GPU or many processes: accelerate shards the batches, syncs gradients, handles mixed
precision and gradient accumulation, and reports to its trackers (tensorboard, wandb, ...) when `log_with` is set.
"""

import math

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

__all__ = ["train_generator"]


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
    project_dir: str | None = None,
    show_progress: bool = True,
) -> list[dict]:
    """Train `generator` on the checkpoints of `bank` and return one record of mean losses per epoch.

    Args:
        generator: a `PeftCVAEGenerator`, usually from `PeftCVAEGenerator.from_bank(bank)`.
        bank: the `LoraBank` whose checkpoints (and task conditions) are the training data.
        epochs: passes over the bank.
        lr: peak learning rate of AdamW; a linear warm-up over `warmup_ratio` of the steps, then cosine decay to 0.
        batch_size: checkpoints per batch *per process*.
        seed: seeds data order, initialisation noise and the reparameterisation noise.
        gradient_accumulation_steps, mixed_precision ("no", "fp16", "bf16"), log_with, project_dir: passed to
            `accelerate.Accelerator` when `accelerator` is not given.

    Returns:
        `[{"epoch": 1, "loss": ..., "reconstruction_loss": ..., "kl_loss": ..., "lr": ...}, ...]`, averaged over all
        batches of the epoch and all processes.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got epochs={epochs}, batch_size={batch_size}.")
    if accelerator is None:
        accelerator = Accelerator(
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=gradient_accumulation_steps,
            log_with=log_with,
            project_dir=project_dir,
        )
    set_seed(seed)
    dataset = TensorDataset(bank.vectors(), bank.checkpoint_conditions())  # (K, N), (K, cond)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(generator.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(loader) / accelerator.gradient_accumulation_steps)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(warmup_ratio * epochs * steps_per_epoch), epochs * steps_per_epoch
    )
    model, optimizer, loader, scheduler = accelerator.prepare(generator, optimizer, loader, scheduler)
    if log_with is not None or accelerator.log_with:
        accelerator.init_trackers("peft-cvae", config={"epochs": epochs, "lr": lr, "batch_size": batch_size})

    history = []
    model.train()
    progress = tqdm(
        range(epochs), desc="training generator", disable=not (show_progress and accelerator.is_main_process)
    )
    for epoch in progress:
        totals = torch.zeros(3, device=accelerator.device)  # summed loss, reconstruction, kl over batches
        for params, condition in loader:
            with accelerator.accumulate(model):
                output = model(params, condition)
                accelerator.backward(output.loss)
                if max_grad_norm is not None and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
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
        progress.set_postfix(loss=f"{record['loss']:.4f}", recon=f"{record['reconstruction_loss']:.4f}")
    model.eval()
    accelerator.end_training()
    return history
