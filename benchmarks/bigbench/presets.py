"""The settings of a BIG-bench zero-shot run, and the presets `full`, `quick` and `tiny`.

Every cache entry is keyed by a hash of the settings fields it depends on (`Settings.key`), not by the preset's name,
so presets that share LoRA settings share LoRAs, and changing one field redoes only what depends on it.
"""

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

from .selection import SelectionRules

__all__ = ["PRESETS", "Settings"]

SELECTION_FIELDS = ("rules", "tiny")
SPLIT_FIELDS = (*SELECTION_FIELDS, "split_seed", "heldout_families", "train_tasks_per_family")
SPLIT_FIELDS += ("heldout_tasks_per_family", "max_train_tasks")
LORA_FIELDS = ("rules", "tiny", "lora_r", "steps", "lr", "batch_size", "save_steps", "last_fraction", "bf16")
LORA_FIELDS += ("lora_seed",)
CONDITION_FIELDS = ("rules", "tiny", "num_examples")
GENERATOR_FIELDS = ("generator_epochs", "generator_lr", "generator_batch_size", "generator_overrides", "lora_seed")
FUNCTIONAL_FIELDS = ("functional_epochs", "functional_lr", "functional_weight", "functional_examples_per_task")
FUNCTIONAL_FIELDS += ("rules", "tiny", "lora_seed", "generator_batch_size")
SCORE_FIELDS = ("rules", "tiny", "scored_test_examples", "bf16")


@dataclass
class Settings:
    """Everything that determines the results of a run."""

    rules: SelectionRules = field(default_factory=SelectionRules)
    # ---- the family split (DESIGN §8: by family, never by variant) ----
    split_seed: int = 0
    heldout_families: int = 24
    train_tasks_per_family: int = 3
    heldout_tasks_per_family: int = 2
    max_train_tasks: int | None = None
    # ---- each task's LoRA, through peft_cvae.collect (SmolLM2-135M, r=8 on q_proj, v_proj, answer-only loss) ----
    lora_r: int = 8
    steps: int = 60
    lr: float = 1e-3
    batch_size: int = 8
    save_steps: int = 2
    last_fraction: float = 1 / 3
    bf16: bool = True
    lora_seed: int = 0
    multitask_step_fraction: float = 1.0  # of (training tasks x steps): the multi-task LoRA's step budget
    # The shared-start bank (issue 13): each bank task's LoRA trained again from the multi-task LoRA (`steps` each),
    # with its own mean / retrieval / top-k rows and a task-memory generator; costs another (bank tasks x steps).
    shared_start_bank: bool = True
    # ---- conditions, controls and scoring ----
    num_examples: int = 8  # example texts per task for the in-context condition (Eq. 1)
    top_k: int = 5  # the top-k description-similarity mix
    top_k_temperature: float = 0.1  # softmax temperature over cosine similarities (task memory's initial value)
    scored_test_examples: int = 100
    seen_tasks: int = 12  # bank tasks scored in the memorisation table
    eval_batch_size: int = 16
    # ---- the generators (today's PeftCVAEGenerator, plain and with task memory) ----
    # GENERATOR_VARIANTS also trained on the description and the examples together (pipeline.combined_conditions:
    # each part centred on the bank's mean and normalised, then concatenated); () trains none
    combined_condition_variants: tuple = ()
    generator_epochs: int = 20
    generator_lr: float = 1e-3
    generator_batch_size: int = 8
    generator_overrides: dict = field(default_factory=lambda: {"hidden_channels": 64, "num_layers": 6})
    # ---- the functional variant (pipeline.FUNCTIONAL_VARIANTS): more epochs with the answer NLL in the loss ----
    functional_epochs: int = 1  # each sample of an epoch costs a base-model pass over its examples
    functional_lr: float = 3e-4
    functional_weight: float = 1.0
    functional_examples_per_task: int = 2
    # which of pipeline.FUNCTIONAL_VARIANTS / FUNCTIONAL_OFFSET_VARIANTS to train (each label is in its own cache key)
    functional_variants: tuple = (
        "task memory + holdout 0.5 + functional",
        "task memory + holdout 0.5 + functional offset",
    )
    # the multi-task LoRA given the functional offset's base-model passes on top of its own steps (the offset's
    # compute-matched control); a whole multi-task LoRA more, hours on a CPU for the full preset
    functional_budget_control: bool = True
    bootstrap_samples: int = 2000
    tiny: bool = False

    def key(self, fields: tuple[str, ...], *parts) -> str:
        """A short hash of the named fields and extra parts: the name of a cache entry."""
        values = {name: _plain(getattr(self, name)) for name in fields}
        text = json.dumps([values, *parts], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return asdict(self)


def _plain(value):
    return asdict(value) if isinstance(value, SelectionRules) else value


PRESETS = {
    # >= 20 held-out families, >= 100 bank tasks (DESIGN §8). About a day on one CPU core; an hour or so on a GPU.
    "full": Settings(
        heldout_families=24,
        train_tasks_per_family=4,  # 3 gave 95 bank tasks for split seed 0; the issue asks for >= 100
        heldout_tasks_per_family=1,
        steps=40,
        bf16=False,  # on this CPU float32 is faster; set True on a GPU
        multitask_step_fraction=0.25,  # a quarter of (bank tasks x steps): the whole budget is ~10 more CPU hours
        scored_test_examples=50,
        seen_tasks=4,  # 11 scores each (~2 CPU min): the memorisation table stays small on a CPU
        # One epoch of the functional offset: ~90 generator steps of 8 checkpoints x 2 examples of up to 256 tokens
        # (2 generators, then 152 more scores). The functional loss without the offset is left out: on quick it
        # moved nothing (held-out answer NLL 7.124 against 7.125 for the variant it continues, over 3 splits).
        functional_epochs=1,
        functional_variants=("task memory + holdout 0.5 + functional offset",),
        # issue 13's "description + examples together", on the design that retrieves best from either alone
        combined_condition_variants=("task memory",),
        # The offset's compute-matched multi-task LoRA would be 1,210 steps, ~2.5 CPU hours more: on when a GPU is
        # lent. The offset's passes add 0.044 x (bank tasks x steps) to the multi-task LoRA's 0.25.
        functional_budget_control=False,
        shared_start_bank=False,  # another ~4 CPU hours: on when a GPU is lent, or across sessions
    ),
    # A few families, few steps, short test sets: <= 20 min cold on 2 CPU cores, the download included.
    "quick": Settings(
        rules=SelectionRules(max_tokens=96, train_examples=100, val_examples=8, test_examples=16),
        heldout_families=2,
        train_tasks_per_family=1,
        heldout_tasks_per_family=1,
        max_train_tasks=4,
        steps=8,
        save_steps=1,
        last_fraction=0.5,
        lr=3e-3,
        batch_size=4,
        bf16=False,  # float32 measured faster than bf16 autocast on this CPU (20 vs 30 s per step under load)
        multitask_step_fraction=0.5,
        scored_test_examples=16,
        seen_tasks=1,
        generator_epochs=30,
        generator_overrides={"hidden_channels": 32, "num_layers": 2, "latent_size": 16},
        functional_epochs=10,  # 16 checkpoints: 2 generator steps per epoch
        bootstrap_samples=1000,
    ),
    # Tiny Llama, tiny tokenizer and encoder, synthetic task.json files in BIG-bench's schema: the smoke test.
    "tiny": Settings(
        rules=SelectionRules(min_examples=30, max_tokens=48, train_examples=40, val_examples=4, test_examples=12),
        heldout_families=2,
        train_tasks_per_family=2,
        heldout_tasks_per_family=1,
        lora_r=2,
        steps=16,
        lr=2e-2,
        batch_size=8,
        save_steps=2,
        last_fraction=0.5,
        bf16=False,
        num_examples=4,
        top_k=3,
        scored_test_examples=12,
        seen_tasks=2,
        eval_batch_size=8,
        multitask_step_fraction=0.25,
        generator_epochs=6,
        generator_lr=3e-3,
        generator_overrides={"patch_size": 16, "hidden_channels": 16, "latent_size": 8, "num_layers": 2},
        functional_epochs=2,
        combined_condition_variants=("task memory",),
        bootstrap_samples=200,
        tiny=True,
    ),
}


def preset(name: str, **overrides) -> Settings:
    return replace(PRESETS[name], **overrides)
