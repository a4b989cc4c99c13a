"""The bank the generators learn from: one LoRA fine-tuned per domain (its checkpoints of the last part of training,
each domain cached as its own small bank folder), conditioned banks, and generators trained on them (cached)."""

import hashlib
import json
from pathlib import Path

import torch

from peft_cvae import LoraBank, PeftCVAEGenerator
from peft_cvae.collect import CollectArguments, TaskData, train_task_lora
from peft_cvae.file_utils import write_json

from ..caching import cached_directory, peak_rss_mb
from ..generator_training import train_timed
from .domains import describe, domain_texts
from .settings import GENERATOR_FIELDS, LORA_FIELDS, Settings

TRAINING_STATS_FILE = "benchmark_training.json"  # in every cached generator folder; marks a finished entry
# Part of each domain LoRA's cache key: LoRAs of the benchmark's earlier hand-written AdamW loop (the committed results
# up to the restructuring of issue 11) are not taken for the library's Trainer path, which shuffles and warms up.
LORA_RECIPE = "peft_cvae.collect.train_task_lora"


def collect_arguments(settings: Settings) -> CollectArguments:
    """The library's fine-tuning arguments for the preset: rank 8 (2 on the tiny preset), alpha 2 r, q_proj and v_proj,
    cosine decay to 0, and the checkpoints of every `save_every`-th step of the last `keep_last` steps."""
    rank = 2 if settings.tiny else 8
    return CollectArguments(
        lora_r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "v_proj"],
        steps=settings.lora_steps,
        lr=settings.lr,
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        save_steps=settings.save_every,
        last_fraction=settings.keep_last / settings.lora_steps,
        bf16=not settings.tiny,
        seed=settings.seed,  # the same LoRA initialisation for every domain
    )


def train_domain_lora(base, tokenizer, name: str, settings: Settings, cache: Path) -> LoraBank:
    """Fine-tune one domain's LoRA the way users do (`peft_cvae.collect.train_task_lora`: a `transformers.Trainer`
    with a `LoraCheckpointCallback`); return the bank of its kept checkpoints."""
    task = TaskData(name, describe(name), texts=domain_texts(name, "train", settings, cache))
    return train_task_lora(base, tokenizer, task, collect_arguments(settings), progress_label=f"LoRA {name}").bank


def build_checkpoint_bank(base, tokenizer, settings: Settings, cache: Path) -> LoraBank:
    """All domains' checkpoints (no conditions yet), each domain cached as its own small bank folder."""
    bank = None
    for name in settings.domains:
        folder = cache / f"lora-{name}-{settings.key(LORA_FIELDS, name, LORA_RECIPE)}"

        def fine_tune(staging: Path, name: str = name) -> None:
            train_domain_lora(base, tokenizer, name, settings, cache).save_pretrained(staging)

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
    parts = (tag, bank.task_names, conditions_hash, settings.key(LORA_FIELDS, LORA_RECIPE))
    folder = cache / f"generator-{tag}-{settings.key(GENERATOR_FIELDS, *parts)}"

    def train(staging: Path) -> None:
        # The presets say task_memory explicitly when they want it: plain otherwise, as when they were recorded (the
        # cache keys, made from generator_overrides, stay the same).
        generator = PeftCVAEGenerator.from_bank(bank, **{"task_memory": False, **settings.generator_overrides})
        rss_before = peak_rss_mb()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        history, seconds = train_timed(generator, bank, settings, seed=settings.seed)
        stats = {
            "train_seconds": seconds,
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
