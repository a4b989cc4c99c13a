"""The bank the generators learn from: one LoRA fine-tuned per domain (its checkpoints of the last part of training,
each domain cached as its own small bank folder), conditioned banks, and generators trained on them (cached)."""

import copy
import hashlib
import json
import math
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from tqdm.auto import tqdm

from peft_cvae import LoraBank, LoraLayout, PeftCVAEGenerator, train_generator
from peft_cvae.file_utils import write_json

from ..caching import cached_directory, peak_rss_mb
from .domains import describe, domain_texts
from .settings import GENERATOR_FIELDS, LORA_FIELDS, Settings

TRAINING_STATS_FILE = "benchmark_training.json"  # in every cached generator folder; marks a finished entry


def token_batches(tokenizer, texts: list[str], settings: Settings) -> list[torch.Tensor]:
    ids = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
    usable = len(ids) // settings.max_length * settings.max_length
    chunks = torch.tensor(ids[:usable]).view(-1, settings.max_length)
    return list(chunks.split(settings.batch_size))


def lora_config(settings: Settings) -> LoraConfig:
    rank = 2 if settings.tiny else 8
    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def train_domain_lora(base, tokenizer, name: str, settings: Settings, cache: Path) -> list[tuple[int, dict]]:
    """Fine-tune one LoRA (same init for every domain) and return (step, state dict) of its last part of training."""
    torch.manual_seed(settings.seed)
    model = get_peft_model(copy.deepcopy(base), lora_config(settings))
    device = next(model.parameters()).device
    batches = token_batches(tokenizer, domain_texts(name, "train", settings, cache), settings)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # cosine decay to 0: the kept checkpoints sit on a converged tail
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / settings.lora_steps))
    )
    checkpoints = []
    model.train()
    for step in tqdm(range(1, settings.lora_steps + 1), desc=f"LoRA {name}", leave=False):
        batch = batches[(step - 1) % len(batches)].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not settings.tiny):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step > settings.lora_steps - settings.keep_last and step % settings.save_every == 0:
            state = get_peft_model_state_dict(model)
            checkpoints.append((step, {key: value.detach().float().cpu().clone() for key, value in state.items()}))
    return checkpoints


def build_checkpoint_bank(base, tokenizer, settings: Settings, cache: Path) -> LoraBank:
    """All domains' checkpoints (no conditions yet), each domain cached as its own small bank folder."""
    bank = None
    for name in settings.domains:
        folder = cache / f"lora-{name}-{settings.key(LORA_FIELDS, name)}"

        def fine_tune(staging: Path, name: str = name) -> None:
            checkpoints = train_domain_lora(base, tokenizer, name, settings, cache)
            config = lora_config(settings)
            config.base_model_name_or_path = getattr(base.config, "_name_or_path", None) or None
            domain_bank = LoraBank(LoraLayout.from_state_dict(checkpoints[0][1], config))
            for step, state in checkpoints:
                domain_bank.add_checkpoint(name, state, step=step)
            domain_bank.save_pretrained(staging)

        domain_bank = LoraBank.from_pretrained(cached_directory(folder, "bank.json", fine_tune))
        bank = bank or LoraBank(domain_bank.layout)
        for checkpoint in domain_bank:
            bank.add_checkpoint(name, checkpoint.state_dict, step=checkpoint.step)
    return bank


def conditioned(bank: LoraBank, names: list[str], conditions: dict, spec: dict | None) -> LoraBank:
    """The checkpoints of `names`, with the given conditions and encoder spec."""
    part = LoraBank(bank.layout, condition_encoder=spec)
    for checkpoint in bank:
        if checkpoint.task in names:
            part.add_checkpoint(checkpoint.task, checkpoint.state_dict, step=checkpoint.step)
    for name in names:
        part.set_condition(name, conditions[name], description=describe(name))
    return part


def trained_generator(bank: LoraBank, settings: Settings, cache: Path, tag: str) -> tuple[PeftCVAEGenerator, dict]:
    """Train (or load from the cache) a generator on `bank`; return it with its training statistics."""
    conditions_hash = hashlib.sha256(bank.condition_matrix().numpy().tobytes()).hexdigest()[:8]
    parts = (tag, bank.task_names, conditions_hash, settings.key(LORA_FIELDS))
    folder = cache / f"generator-{tag}-{settings.key(GENERATOR_FIELDS, *parts)}"

    def train(staging: Path) -> None:
        generator = PeftCVAEGenerator.from_bank(bank, **settings.generator_overrides)
        rss_before = peak_rss_mb()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        history = train_generator(
            generator,
            bank,
            epochs=settings.generator_epochs,
            lr=settings.generator_lr,
            batch_size=settings.generator_batch_size,
            seed=settings.seed,
        )
        stats = {
            "train_seconds": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb(),
            "peak_rss_growth_mb": peak_rss_mb() - rss_before,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
            "first_loss": history[0]["loss"],
            "final_loss": history[-1]["loss"],
            "final_reconstruction_loss": history[-1]["reconstruction_loss"],
            "history": history,
        }
        generator.cpu().save_pretrained(staging)
        write_json(stats, staging / TRAINING_STATS_FILE)

    cached_directory(folder, TRAINING_STATS_FILE, train)
    generator = PeftCVAEGenerator.from_pretrained(folder).eval()
    return generator, json.loads((folder / TRAINING_STATS_FILE).read_text())
