"""Really-trained LoRA banks of synthetic token tasks for the tests, in seconds (no downloads).

The tiny models themselves come from `peft_cvae.testing_utils`, shared with the examples' `--quick` mode."""

import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict

from peft_cvae.testing_utils import tiny_llama

VOCAB_SIZE = 64
TASKS = ("ascending", "descending", "repeating")


def tiny_lora_config(**overrides) -> LoraConfig:
    fields = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    return LoraConfig(**{**fields, **overrides})


def task_batch(task: str, generator: torch.Generator, batch_size: int = 8, length: int = 16) -> torch.Tensor:
    """Token sequences of one synthetic task; each task is a different deterministic pattern over the vocabulary."""
    start = torch.randint(0, VOCAB_SIZE, (batch_size, 1), generator=generator)
    position = torch.arange(length)
    if task == "ascending":
        return (start + position) % VOCAB_SIZE
    if task == "descending":
        return (start - 3 * position) % VOCAB_SIZE
    if task == "repeating":
        return (start + 7 * (position % 2)) % VOCAB_SIZE
    raise ValueError(task)


def fine_tune(model, loss, *, steps: int, keep_from: int, every: int, state_dict, lr: float = 2e-2) -> list:
    """AdamW on the trainable (LoRA) parameters of `model`, one `loss(model)` per step; returns `(step,
    state_dict(model))` at the steps >= keep_from that are multiples of `every`. The tests' deterministic stand-in
    for a fine-tuning run (no Trainer, no data loader), shared by the LLM and the UNet banks."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    checkpoints = []
    model.train()
    for step in range(1, steps + 1):
        loss(model).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= keep_from and step % every == 0:
            checkpoints.append((step, state_dict(model)))
    return checkpoints


def train_lora_checkpoints(task: str, *, steps: int = 40, keep_from: int = 25, every: int = 5, seed: int = 0):
    """Fine-tune a LoRA on one task and return the PEFT state dicts of the last part of training (step, state)."""
    model = get_peft_model(tiny_llama(), tiny_lora_config())  # same LoRA init for every task, as with a fixed seed
    data = torch.Generator().manual_seed(seed)

    def loss(model):
        tokens = task_batch(task, data)
        return model(input_ids=tokens, labels=tokens).loss

    def state(model):
        return {key: value.detach().clone() for key, value in get_peft_model_state_dict(model).items()}

    checkpoints = fine_tune(model, loss, steps=steps, keep_from=keep_from, every=every, state_dict=state)
    return checkpoints, model.peft_config["default"]


def task_conditions(size: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """One fixed random task vector per synthetic task."""
    generator = torch.Generator().manual_seed(seed)
    return {task: torch.randn(size, generator=generator) for task in TASKS}


def build_bank():
    """A LoraBank of the three synthetic tasks, 4 real checkpoints each."""
    from peft_cvae import LoraBank, LoraLayout

    bank = None
    conditions = task_conditions()
    for task in TASKS:
        checkpoints, config = train_lora_checkpoints(task)
        if bank is None:
            bank = LoraBank(LoraLayout.from_state_dict(checkpoints[0][1], config))
        for step, state in checkpoints:
            bank.add_checkpoint(task, state, step=step)
        bank.set_condition(task, conditions[task], description=f"token sequences that follow the {task} pattern")
    return bank


def small_generator_overrides() -> dict:
    """Network sizes that train in seconds on the tiny layout."""
    return {"patch_size": 16, "hidden_channels": 32, "latent_size": 8, "num_layers": 2}
