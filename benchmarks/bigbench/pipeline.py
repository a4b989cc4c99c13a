"""The expensive steps of the BIG-bench zero-shot benchmark, each cached atomically under the cache folder.

- `task_loras`: one LoRA per task (bank tasks and held-out oracles) through `peft_cvae.collect.train_task_lora`, the
  package's own collection path; each task's kept checkpoints are saved as a one-task `LoraBank`.
- `task_loras(..., start=multitask_start(...))`: the shared-start bank (issue 13): every bank task's LoRA again,
  starting from the multi-task LoRA instead of the random initialisation, so that all of them differ from one trained
  start.
- `multitask_lora`: one LoRA on the union of all bank tasks' training examples (each example keeps its own task's
  prompt format), with `multitask_step_fraction` x (bank tasks x steps) optimiser steps.
- `conditions`: description vectors (MiniLM, `TextTaskEncoder`) and in-context vectors (Eq. 1,
  `HiddenStateTaskEncoder` over each task's first `num_examples` training examples, prompt + answer).
- `train_generators`: today's `PeftCVAEGenerator.from_bank`, plain and with `task_memory=True`, on the description
  bank and on the in-context bank (the same checkpoints, other conditions).
- `train_functional_generators`: the `FUNCTIONAL_VARIANTS` and `FUNCTIONAL_OFFSET_VARIANTS`, trained on from those
  generators with the functional loss.
- `Scorer`: answer NLL / accuracy of one LoRA on one task's test examples, cached per (task, control, LoRA key).

Nothing is written half: banks and generators go through `save_pretrained` (atomic), JSON through `write_json`.
"""

import copy
import hashlib
import logging
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from peft import get_peft_model
from peft.utils import set_peft_model_state_dict

from peft_cvae import LoraBank, PeftCVAEGenerator, train_generator
from peft_cvae.answer_evaluation import evaluate_answers
from peft_cvae.collect import CollectArguments, TaskData, TaskExample, train_task_lora
from peft_cvae.file_utils import folder_lock, read_json, write_json
from peft_cvae.functional_loss import FunctionalLoss

from ..generator_training import train_timed
from .presets import CONDITION_FIELDS, FUNCTIONAL_FIELDS, GENERATOR_FIELDS, LORA_FIELDS, SCORE_FIELDS, Settings
from .selection import BenchTask

# "plain" asks for task_memory=False: from_bank defaults to task memory. "task memory + holdout 0.5" hides a sample's
# own task from the memory half the time in training (PeftCVAEConfig.memory_holdout), so that the decoder learns to
# correct the neighbours' mix from the condition: issue 13's "retrieval prior with the CVAE decoding the correction".
GENERATOR_VARIANTS = {
    "plain": {"task_memory": False},
    "task memory": {"task_memory": True},
    "task memory + holdout 0.5": {"task_memory": True, "memory_holdout": 0.5},
    # the memory compares conditions centred on the bank's mean (PeftCVAEConfig.memory_centered): raw in-context
    # vectors all have cosines near 1, and the mix of an unseen task spread over ~27 of 103 tasks (full, split 0)
    "task memory, centred": {"task_memory": True, "memory_centered": True},
}
CONDITION_KINDS = ("description", "examples")
# Both together (issue 13's "richer conditions"), built from the two by `combined_conditions`
COMBINED_KIND = "description + examples"
# On the shared-start bank (`task_loras(..., start=multitask_start(...))`), labelled apart: the label is in the key.
SHARED_START_VARIANTS = {"shared start + task memory": {"task_memory": True}}
# The functional lever (issue 13, Text-to-LoRA's SFT mode): a variant's trained generator, trained on for
# `functional_epochs` with the answer NLL of each decoded LoRA on a few of its task's training examples added to the
# loss (`peft_cvae.FunctionalLoss`). On top of the leave-one-task-out memory, the decoder learns to correct the
# neighbours' mix by what the correction does to the task's answers, not by how close it is to the stored checkpoint:
# the situation of an unseen task, with the objective that matters. `{label: variant it continues}`.
FUNCTIONAL_VARIANTS = {"task memory + holdout 0.5 + functional": "task memory + holdout 0.5"}
# The same, with a functional offset (`PeftCVAEConfig.functional_offset`): a LoRA-sized vector trained by the
# functional loss only, at the LoRAs' own lr, added to every generated LoRA, with the loss on what generation writes
# (z = 0, the own task hidden from the memory as memory_holdout draws). What the pooled data teaches a multi-task
# LoRA can go into the offset; the decoder and memory keep the task-specific part.
FUNCTIONAL_OFFSET_VARIANTS = {"task memory + holdout 0.5 + functional offset": "task memory + holdout 0.5"}


def save_json(data, path: Path) -> None:
    """`write_json` (atomic) into a folder created if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(data, path)


def collect_arguments(settings: Settings, steps: int | None = None) -> CollectArguments:
    return CollectArguments(
        lora_r=settings.lora_r,
        steps=steps or settings.steps,
        lr=settings.lr,
        batch_size=settings.batch_size,
        max_length=settings.rules.max_tokens + 1,  # + EOS after the answer
        save_steps=settings.save_steps,
        last_fraction=settings.last_fraction,
        bf16=settings.bf16,
        seed=settings.lora_seed,
    )


def _quiet_bank_load(folder: Path) -> LoraBank:
    return LoraBank.from_pretrained(folder)


# ---- LoRAs ---------------------------------------------------------------------------------------------------------
def task_loras(
    base, tokenizer, tasks: list[BenchTask], settings: Settings, cache: Path, *, what: str, start: dict | None = None
) -> dict:
    """`{task name: {"bank": LoraBank (its kept checkpoints), "train_seconds", "loss", "steps"}}`, training what is
    not cached yet (one task at a time, so an interrupted run resumes at the task it was on).

    `start`: `{"key": cache key, "state_dict": LoRA}` to start every LoRA from (collect's `start_adapter` path),
    e.g. `multitask_start(...)`; None: the shared random initialisation."""
    folder = cache / "loras" / settings.key(LORA_FIELDS)
    if start is not None:
        folder = cache / "loras" / settings.key(LORA_FIELDS, "start", start["key"])
    results = {}
    for index, task in enumerate(tasks):
        entry = folder / task.name
        if not (entry / "summary.json").is_file():
            data = task.task_data("train")
            label = f"{what} LoRA [{index + 1}/{len(tasks)}] {task.name}"
            result = train_task_lora(
                base, tokenizer, data, collect_arguments(settings), progress_label=label,
                start=None if start is None else start["state_dict"],
            )  # fmt: skip
            result.bank.save_pretrained(entry / "bank")
            summary = {"train_seconds": result.train_seconds, "loss": result.loss, "steps": result.steps}
            save_json(summary, entry / "summary.json")  # last: marks the entry complete
            del result
        results[task.name] = {**read_json(entry / "summary.json"), "bank": _quiet_bank_load(entry / "bank")}
    return results


def multitask_lora(
    base, tokenizer, tasks: list[BenchTask], settings: Settings, cache: Path, step_fraction: float | None = None
) -> dict:
    """One LoRA on every bank task's training examples (Text-to-LoRA's main baseline), cached; `step_fraction` x
    (bank tasks x steps) optimiser steps (default `settings.multitask_step_fraction`)."""
    fraction = settings.multitask_step_fraction if step_fraction is None else step_fraction
    steps = max(1, round(fraction * settings.steps * len(tasks)))
    key = _multitask_key(settings, fraction, tasks)
    entry = cache / "multitask" / key
    partial = cache / "multitask" / f"{key}.partial"  # the Trainer's resumable state while it trains
    # Hours on a CPU: a second process waits here for the first instead of training it again (the lock goes with the
    # process that holds it), and a killed run continues from its last resumable checkpoint.
    with folder_lock(partial, timeout=7 * 24 * 3600):
        if not (entry / "summary.json").is_file():
            _train_multitask(base, tokenizer, tasks, settings, steps, entry, partial)
    return {**read_json(entry / "summary.json"), "bank": _quiet_bank_load(entry / "bank"), "fraction": fraction}


def _train_multitask(base, tokenizer, tasks, settings: Settings, steps: int, entry: Path, partial: Path) -> None:
    """Train the multi-task LoRA into `entry`, resumable through `partial` (removed once `entry` is complete). Only
    its final step is kept (what every consumer reads), so that its resumable checkpoints run to the end."""
    examples = [
        TaskExample(input=task.input_prefix + e.input + task.output_prefix, target=e.target, choices=e.choices)
        for task in tasks
        for e in task.splits["train"]
    ]
    data = TaskData(
        name="multitask", description="all bank tasks", examples=examples, input_prefix="", output_prefix=""
    )
    args = replace(collect_arguments(settings, steps=steps), save_steps=1, last_fraction=1 / steps)
    label = f"multi-task LoRA ({steps} steps)"
    result = train_task_lora(base, tokenizer, data, args, progress_label=label, resume_dir=partial, resume_every=25)
    result.bank.save_pretrained(entry / "bank")
    summary = {"train_seconds": result.train_seconds, "loss": result.loss, "steps": steps}
    summary["resumed_from"] = result.resumed_from  # train_seconds: this process's share only
    save_json(summary, entry / "summary.json")
    shutil.rmtree(partial, ignore_errors=True)


def functional_budget_fraction(settings: Settings, checkpoints: int, tasks: int) -> float:
    """The functional training's base-model passes as a multi-task step fraction: its generator steps x samples x
    examples per sample, in multi-task LoRA steps of `batch_size` examples, over (tasks x steps). What a multi-task
    LoRA gets on top of its own steps to match the functional-offset generator's compute."""
    generator_steps = settings.functional_epochs * math.ceil(checkpoints / settings.generator_batch_size)
    passes = generator_steps * settings.generator_batch_size * settings.functional_examples_per_task
    return passes / settings.batch_size / (tasks * settings.steps)


def multitask_start(multitask: dict, settings: Settings, tasks: list[BenchTask]) -> dict:
    """The multi-task LoRA's last checkpoint as the start of a shared-start bank (`task_loras(..., start=...)`)."""
    key = _multitask_key(settings, settings.multitask_step_fraction, tasks)
    return {"key": key, "state_dict": multitask["bank"].checkpoints[-1].state_dict}


def _multitask_key(settings: Settings, fraction: float, tasks: list[BenchTask]) -> str:
    """The cache key of the multi-task LoRA of `fraction` x (tasks x steps) on `tasks`."""
    return settings.key(LORA_FIELDS, "multitask", fraction, sorted(task.name for task in tasks))


def final_vector(bank: LoraBank) -> torch.Tensor:
    """The flat vector of the last kept checkpoint (the LoRA at the end of training). Shape (N,)."""
    return bank.layout.flatten(bank.checkpoints[-1].state_dict)


def mean_vector(bank: LoraBank) -> torch.Tensor:
    """The mean of the kept checkpoints' flat vectors (what a faithful generator converges to). Shape (N,)."""
    return torch.stack([bank.layout.flatten(checkpoint.state_dict) for checkpoint in bank.checkpoints]).mean(dim=0)


# ---- conditions ----------------------------------------------------------------------------------------------------
def example_texts(task: BenchTask, count: int) -> list[str]:
    return task.task_data("train").sample_texts(count)


def conditions(text_encoder, hidden_encoder, tasks: list[BenchTask], extra_texts: dict, settings, cache) -> dict:
    """`{"description": {name: (384,)}, "examples": {name: (H,)}}` for `tasks`, plus `extra_texts` ({label: text},
    encoded both ways: a text for the description encoder, the same text as a one-example list for Eq. 1)."""
    path = cache / "conditions" / f"{settings.key(CONDITION_FIELDS, text_encoder.to_dict())}.json"
    stored = read_json(path) if path.is_file() else {"description": {}, "examples": {}}
    todo = [task for task in tasks if task.name not in stored["description"] or task.name not in stored["examples"]]
    todo_extra = {label: text for label, text in extra_texts.items() if label not in stored["description"]}
    if todo or todo_extra:
        for task in todo:
            stored["description"][task.name] = text_encoder.encode(task.description).tolist()
            stored["examples"][task.name] = hidden_encoder.encode(example_texts(task, settings.num_examples)).tolist()
        for label, text in todo_extra.items():
            stored["description"][label] = text_encoder.encode(text).tolist()
            stored["examples"][label] = hidden_encoder.encode([text]).tolist()
        save_json(stored, path)
    return {kind: {name: torch.tensor(vector) for name, vector in stored[kind].items()} for kind in CONDITION_KINDS}


def combined_conditions(vectors: dict, bank_names: list[str]) -> dict[str, torch.Tensor]:
    """`{name: (384 + H,)}`: each name's description and in-context vectors, each centred on the bank tasks' mean and
    scaled to unit norm, concatenated. The cosine of two such vectors is the mean of the two parts' centred cosines,
    so both parts steer a task memory equally: raw in-context vectors share one large direction (their cosines are
    all close to 1) and would otherwise count for less than the description."""
    parts = []
    for kind in CONDITION_KINDS:
        center = torch.stack([vectors[kind][name] for name in bank_names]).mean(dim=0)  # (D,)
        parts.append({name: torch.nn.functional.normalize(v - center, dim=0) for name, v in vectors[kind].items()})
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0] if name in parts[1]}


# ---- generators ----------------------------------------------------------------------------------------------------
def condition_bank(loras: dict, vectors: dict, spec: dict, descriptions: dict) -> LoraBank:
    """One bank of every bank task's kept checkpoints, conditioned on `vectors` (one kind)."""
    bank = None
    for name, entry in loras.items():
        source = entry["bank"]
        if bank is None:
            bank = LoraBank(source.layout, condition_encoder=spec)
        for checkpoint in source.checkpoints:
            bank.add_checkpoint(name, checkpoint.state_dict, step=checkpoint.step)
        bank.set_condition(name, vectors[name], description=descriptions[name])
    return bank


def train_generators(
    banks: dict[str, LoraBank], settings: Settings, cache: Path, variants: dict[str, dict] | None = None
) -> dict:
    """`{(kind, variant): {"generator", "train_seconds", "first_loss", "final_loss"}}`, trained unless cached.

    `variants`: `{label: from_bank overrides}`, default `GENERATOR_VARIANTS` (the label is part of the cache key)."""
    generators = {}
    for kind, bank in banks.items():
        for variant, overrides in (variants or GENERATOR_VARIANTS).items():
            key = settings.key(GENERATOR_FIELDS, settings.key(LORA_FIELDS), kind, variant, bank.task_names)
            entry = cache / "generators" / key
            if not (entry / "summary.json").is_file():
                torch.manual_seed(settings.lora_seed)
                generator = PeftCVAEGenerator.from_bank(bank, **settings.generator_overrides, **overrides)
                history, seconds = train_timed(generator, bank, settings, seed=settings.lora_seed)
                generator.save_pretrained(entry / "generator")
                summary = {
                    "train_seconds": seconds,
                    "first_loss": history[0]["loss"],
                    "final_loss": history[-1]["loss"],
                    "parameters": sum(p.numel() for p in generator.parameters()),
                }
                save_json(summary, entry / "summary.json")
            generator = PeftCVAEGenerator.from_pretrained(entry / "generator").eval()
            generators[kind, variant] = {**read_json(entry / "summary.json"), "generator": generator, "key": key}
    return generators


def train_functional_generators(
    generators: dict, banks: dict[str, LoraBank], tasks: list[BenchTask], base, tokenizer, settings: Settings,
    cache: Path, variants: dict[str, str] | None = None,
) -> dict:  # fmt: skip
    """`{(kind, label): {...}}` like `train_generators`, for `variants` (`{label: variant}`; default: those of
    `FUNCTIONAL_VARIANTS` and `FUNCTIONAL_OFFSET_VARIANTS` that `settings.functional_variants` names): each starts
    from `generators[kind, variant]` and trains `functional_epochs` more epochs with the CVAE loss +
    `functional_weight` x the answer NLL of the decoded LoRA on `functional_examples_per_task` of its task's training
    examples (held-out families never: `tasks` are the bank's).
    Cached like the others. `functional_epochs` 0: none (the variant is skipped, and its rows in the report)."""
    trained = {}
    if settings.functional_epochs == 0:
        return trained
    functional = None  # built once, when a generator has to be trained: it copies the base model
    if variants is None:
        every = {**FUNCTIONAL_VARIANTS, **FUNCTIONAL_OFFSET_VARIANTS}
        variants = {label: every[label] for label in settings.functional_variants}
    for kind, bank in banks.items():
        for label, variant in variants.items():
            start = generators[kind, variant]
            offset = label in FUNCTIONAL_OFFSET_VARIANTS
            # the offset's settings join the key (the older variant's key stays as it was)
            extra = ("offset", settings.lr, "on generated") if offset else ()
            key = settings.key(FUNCTIONAL_FIELDS, start["key"], label, *extra)
            entry = cache / "generators" / key
            if not (entry / "summary.json").is_file():
                if functional is None:
                    functional = FunctionalLoss(
                        base, tokenizer, [task.task_data("train") for task in tasks], bank.layout,
                        examples_per_task=settings.functional_examples_per_task,
                        max_length=settings.rules.max_tokens + 1, weight=settings.functional_weight,
                        seed=settings.lora_seed,
                    )  # fmt: skip
                # the offset learns at the bank LoRAs' lr, on the LoRA generation writes; the plain variant as before
                on_generated, offset_lr = (True, settings.lr) if offset else (False, None)
                variant_loss = functional.with_options(on_generated=on_generated, offset_lr=offset_lr)
                generator = PeftCVAEGenerator.from_pretrained(cache / "generators" / start["key"] / "generator")
                if offset:
                    generator = with_functional_offset(generator)
                started = time.perf_counter()
                history = train_generator(
                    generator, bank, epochs=settings.functional_epochs, lr=settings.functional_lr,
                    batch_size=settings.generator_batch_size, seed=settings.lora_seed, functional_loss=variant_loss,
                    early_stopping_patience=0,  # a fixed budget of epochs: each costs base-model passes
                )  # fmt: skip
                seconds = time.perf_counter() - started
                generator.save_pretrained(entry / "generator")
                summary = {
                    "train_seconds": seconds,
                    "first_loss": history[0]["loss"],
                    "final_loss": history[-1]["loss"],
                    "first_functional_loss": history[0]["functional_loss"],
                    "final_functional_loss": history[-1]["functional_loss"],
                    "parameters": sum(p.numel() for p in generator.parameters()),
                    "continues": variant,
                }
                if offset:
                    summary["offset_abs_mean"] = generator.functional_offset.detach().abs().mean().item()
                save_json(summary, entry / "summary.json")
            generator = PeftCVAEGenerator.from_pretrained(entry / "generator").eval()
            trained[kind, label] = {**read_json(entry / "summary.json"), "generator": generator, "key": key}
    return trained


def with_functional_offset(generator: PeftCVAEGenerator) -> PeftCVAEGenerator:
    """A copy of a trained generator with a functional offset (`PeftCVAEConfig.functional_offset`) at zero: it
    writes the same LoRAs until a functional loss trains the offset."""
    config = copy.deepcopy(generator.config)
    config.functional_offset = True
    extended = PeftCVAEGenerator(config)
    load = extended.load_state_dict(generator.state_dict(), strict=False)
    if load.missing_keys != ["functional_offset"] or load.unexpected_keys:
        raise RuntimeError(f"Adding a functional offset: unexpected load result {load}.")
    return extended


def generated_vector(generator: PeftCVAEGenerator, condition: torch.Tensor) -> torch.Tensor:
    """The LoRA the generator writes for a condition at z = 0 (its mean), as a flat vector. Shape (N,).

    Held-out tasks, shuffled descriptions and random strings are far from the bank by design, so generate_adapter's
    "not close to any training task" warning (meant for a user's one request) is silenced here: it came once per
    scored condition and buried the progress bars."""
    generation_log = logging.getLogger("peft_cvae.generation")
    level = generation_log.level
    generation_log.setLevel(logging.ERROR)
    try:
        adapter = generator.generate_adapter(condition.float(), temperature=0.0)
    finally:
        generation_log.setLevel(level)
    return generator.config.lora_layout.flatten({k: v.float() for k, v in adapter.state_dict.items()})


# ---- retrieval controls --------------------------------------------------------------------------------------------
def similarity_mix(query: torch.Tensor, keys: torch.Tensor, vectors: torch.Tensor, top_k: int, temperature: float):
    """(nearest index, top-k softmax mix of `vectors`, weights) for cosine similarities of `query` (D,) to `keys`
    (T, D); `vectors` (T, N)."""
    similarity = torch.nn.functional.cosine_similarity(query[None].float(), keys.float(), dim=-1)  # (T,)
    k = min(top_k, len(similarity))
    top = similarity.topk(k)
    weights = torch.softmax(top.values / temperature, dim=0)  # (k,)
    mix = (weights[:, None] * vectors[top.indices]).sum(dim=0)
    return int(similarity.argmax()), mix, {int(i): float(w) for i, w in zip(top.indices, weights)}


# ---- scoring -------------------------------------------------------------------------------------------------------
class Scorer:
    """Scores LoRA vectors on a task's test examples with one `PeftModel` whose adapter weights are swapped in."""

    def __init__(self, base, tokenizer, layout, settings: Settings, cache: Path):
        self.tokenizer = tokenizer
        self.layout = layout
        self.settings = settings
        self.folder = cache / "scores" / settings.key(SCORE_FIELDS)
        torch.manual_seed(0)
        self.model = get_peft_model(copy.deepcopy(base), layout.peft_config()).eval()  # the base stays LoRA-free
        self.autocast = torch.bfloat16 if settings.bf16 else None
        self.scored = 0
        self.seconds = 0.0

    def score(self, task: BenchTask, control: str, key: str, vector: torch.Tensor | None) -> dict:
        """Answer NLL / accuracy of `vector` (None: the base model) on `task`'s test examples; cached by `key`, and by
        the vector's bytes: a row that writes a LoRA another row already scored on this task (retrieval by the
        description and by the examples often pick the same bank task) reuses that score, with 0 seconds."""
        path = self.folder / task.name / f"{_slug(control)}-{key}.json"
        if path.is_file():
            return read_json(path)
        same_vector = None
        if vector is not None:
            digest = hashlib.sha256(vector.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
            same_vector = self.folder / task.name / "by_vector" / f"{digest}.json"
            if same_vector.is_file():
                summary = {**read_json(same_vector), "seconds": 0.0}
                save_json(summary, path)
                return summary
        examples = task.splits["test"][: self.settings.scored_test_examples]
        start = time.perf_counter()
        arguments = {
            "input_prefix": task.input_prefix,
            "output_prefix": task.output_prefix,
            "batch_size": self.settings.eval_batch_size,
            "autocast_dtype": self.autocast,
            "desc": f"{task.name}: {control}",
        }
        if vector is None:
            with self.model.disable_adapter():
                result = evaluate_answers(self.model, self.tokenizer, examples, **arguments)
        else:
            state_dict = self.layout.unflatten(vector.float())
            load = set_peft_model_state_dict(self.model, state_dict)
            if load.unexpected_keys:
                raise RuntimeError(f"Scoring {control}: unexpected LoRA keys {load.unexpected_keys[:3]}")
            result = evaluate_answers(self.model, self.tokenizer, examples, **arguments)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self.scored += 1
        summary = {key: result[key] for key in ("answer_nll", "accuracy", "num_tokens", "num_examples")}
        summary["seconds"] = round(seconds, 3)
        summary["example_nll"] = [round(v, 4) for v in result["example_nll"]]
        summary["example_tokens"] = result["example_tokens"]
        if not math.isfinite(summary["answer_nll"]):
            raise RuntimeError(f"Scoring {control} on {task.name} gave a non-finite answer NLL.")
        if same_vector is not None:
            save_json(summary, same_vector)
        save_json(summary, path)
        return summary


def _slug(text: str) -> str:
    return "".join(character if character.isalnum() else "_" for character in text.lower()).strip("_")
