"""What determines the LoRA-generation benchmark's results: `Settings`, the named presets, and which settings fields
each cached step depends on (so presets that share those fields share the cached step)."""

from dataclasses import dataclass, field, replace

from ..caching import cache_key

DEFAULT_BASE_MODEL = "smollm2-135m"
CONDITION_KINDS = ("description", "examples")  # TextTaskEncoder on descriptions; HiddenStateTaskEncoder (Eq. 1)

LORA_FIELDS = ("lora_steps", "keep_last", "save_every", "batch_size", "max_length", "lr", "train_texts")
LORA_FIELDS += ("train_max_chars", "tiny", "seed")
EVAL_FIELDS = ("eval_texts", "eval_max_chars", "eval_max_length", "tiny")
GENERATOR_FIELDS = ("generator_epochs", "generator_lr", "generator_batch_size", "generator_overrides", "seed")
CONDITION_FIELDS = ("example_texts", "example_max_length", "train_max_chars", "tiny")


@dataclass
class Settings:
    """Everything that determines the results. Each cache entry is keyed by the fields it depends on."""

    domains: list[str]
    lora_steps: int = 120
    keep_last: int = 40  # checkpoints of the last `keep_last` steps go into the bank (the paper: last third)
    save_every: int = 1
    batch_size: int = 8
    max_length: int = 128
    lr: float = 5e-4  # peak; cosine decay to 0 so the kept checkpoints sit on a converged tail
    train_texts: int = 400
    train_max_chars: int = 4000
    eval_texts: int = 40
    eval_max_chars: int = 4000
    eval_max_length: int = 128
    example_texts: int = 8  # in-context examples per domain (from its train split) for Eq. 1 task vectors
    example_max_length: int = 128
    generator_epochs: int = 300
    generator_lr: float = 1e-3
    generator_batch_size: int = 8
    generator_overrides: dict = field(
        default_factory=lambda: {"hidden_channels": 64, "num_layers": 6, "task_memory": True}
    )
    best_of_k: int = 4
    leave_one_out: list[str] = field(default_factory=list)
    fusion_pairs: list[list[str]] = field(default_factory=list)
    tiny: bool = False
    seed: int = 0
    base_model: str = DEFAULT_BASE_MODEL  # a name of benchmarks.assets.BASE_MODELS (ignored when tiny)

    def key(self, fields: tuple[str, ...], *parts) -> str:
        """A short hash of the named fields and extra parts: the name of a cache entry. Every entry depends on the
        base model; it joins the hash only when it is not SmolLM2, so the cache entries of the runs made before
        there was a choice keep their names."""
        values = {name: getattr(self, name) for name in fields}
        if self.base_model != DEFAULT_BASE_MODEL and not self.tiny:
            values["base_model"] = self.base_model
        return cache_key(values, *parts)


BBC = ["business", "entertainment", "politics", "sport", "tech"]
# LoRA and evaluation settings of the first CPU runs (the caches are keyed by these fields, not by the preset, so
# presets that share them share LoRAs and scores).
_CPU = {
    "lora_steps": 40,
    "keep_last": 20,
    "save_every": 4,
    "batch_size": 4,
    "max_length": 96,
    "lr": 1e-3,
    "train_texts": 120,
    "train_max_chars": 2000,
    "eval_texts": 6,
    "eval_max_chars": 500,
    "eval_max_length": 96,
    "example_texts": 4,
    "example_max_length": 96,
    "generator_epochs": 100,
    "generator_overrides": {"hidden_channels": 32, "num_layers": 2, "latent_size": 16},
}
PRESETS = {
    "full": Settings(  # the defaults: DESIGN.md §6 sizes, for a GPU
        domains=[*BBC, "python_code", "man_pages"],
        leave_one_out=[*BBC, "python_code", "man_pages"],
        fusion_pairs=[["sport", "tech"], ["business", "politics"], ["python_code", "man_pages"]],
    ),
    "full-cpu": Settings(
        domains=["business", "politics", "man_pages", "sport", "tech", "python_code"],
        leave_one_out=["sport", "python_code", "man_pages"],
        fusion_pairs=[["sport", "tech"], ["python_code", "man_pages"]],
        best_of_k=2,
        **_CPU,
    ),
    "tiny": Settings(
        domains=["ascending", "descending", "repeating"],
        lora_steps=20,
        keep_last=10,
        save_every=5,
        batch_size=8,
        max_length=16,
        lr=2e-2,
        train_texts=64,
        eval_texts=8,
        eval_max_length=16,
        example_texts=4,
        generator_epochs=60,
        generator_lr=3e-3,
        generator_overrides={"patch_size": 16, "hidden_channels": 32, "latent_size": 8, "num_layers": 2},
        best_of_k=2,
        leave_one_out=["repeating"],
        fusion_pairs=[["ascending", "descending"]],
        tiny=True,
    ),
}
# full-cpu with PeftCVAEConfig.task_memory: the second design, after full-cpu showed the plain decoder collapse.
PRESETS["full-cpu-memory"] = replace(
    PRESETS["full-cpu"], generator_overrides={**_CPU["generator_overrides"], "task_memory": True}
)
# The CPU run of record: full-cpu-memory with the paper's checkpoint protocol (every step of the last third of a
# 3x longer, cosine-decayed LoRA run: 40 checkpoints per domain instead of 5), twice the held-out text, leave-one-out
# on every domain and a third fusion pair. Task vectors are shared with the other CPU presets.
PRESETS["full-cpu-converged"] = replace(
    PRESETS["full-cpu-memory"],
    lora_steps=120,
    keep_last=40,
    save_every=1,
    eval_texts=10,
    eval_max_chars=1000,
    generator_epochs=20,  # 240 checkpoints: 20 epochs are 600 optimizer steps (full-cpu-memory: 100 x 4 = 400)
    leave_one_out=["business", "politics", "man_pages", "sport", "tech", "python_code"],
    fusion_pairs=[["sport", "tech"], ["business", "politics"], ["python_code", "man_pages"]],
)
# The run of record with the task memory comparing conditions centred on the training tasks' mean
# (PeftCVAEConfig.memory_centered): issue 13's no-regression check before centring could become the default. It shares
# LoRAs, task vectors and held-out text with the run of record when both run on one cache (the keys are those fields);
# benchmarks/notes/full-cpu-centred.md compares the two on one cache.
PRESETS["full-cpu-centred"] = replace(
    PRESETS["full-cpu-converged"],
    generator_overrides={**PRESETS["full-cpu-converged"].generator_overrides, "memory_centered": True},
)
# The run of record on three of its domains, scored on less text so that a cold run stays under 15 minutes on two
# cores (it shares the run of record's LoRAs when both run on one cache).
PRESETS["quick"] = replace(
    PRESETS["full-cpu-converged"],
    domains=["sport", "tech", "python_code"],
    eval_texts=_CPU["eval_texts"],
    eval_max_chars=_CPU["eval_max_chars"],
    leave_one_out=["tech"],
    fusion_pairs=[["sport", "tech"]],
)
# A second model family (issue 17): Gemma-3-270M (Gemma3ForCausalLM, 262,144-token vocabulary, 18 layers of width
# 640) on three of the run of record's domains, one per source (BBC News, Python code, man pages). Its LM head alone
# costs ~4x SmolLM2's whole forward pass per token (~12 CPU-seconds per LoRA step of 4 x 32 tokens), and the 2-core
# CPU it ran on was shared with five other jobs (load ~16), so everything is cut to fit ~20 CPU-minutes: 12 LoRA
# steps at a higher learning rate keeping every step of the last 6 (6 checkpoints per domain), 3 held-out texts of
# 300 characters scored in one window each (after Gemma's <bos>), 15 generator epochs, no held-out domain and no
# fusion pair (each held-out domain trains two more generators).
PRESETS["gemma3"] = replace(
    PRESETS["quick"],
    base_model="gemma3-270m",
    domains=["sport", "python_code", "man_pages"],
    lora_steps=12,
    keep_last=6,
    save_every=1,
    batch_size=4,
    max_length=32,
    lr=3e-3,
    train_texts=40,
    train_max_chars=600,
    eval_texts=3,
    eval_max_chars=300,
    eval_max_length=128,  # one window per held-out text, so each is scored after Gemma's <bos>
    example_texts=4,
    example_max_length=48,
    generator_epochs=15,  # 18 checkpoints in batches of 8: 15 epochs are 45 optimizer steps (loss 0.007 by then)
    best_of_k=2,
    leave_one_out=[],
    fusion_pairs=[],
)
# Presets whose report is a page of the docs (the others write it next to their JSON). docs/benchmarks.md holds the run
# of record; the earlier designs keep their own pages, and every page carries the table comparing them all.
REPORT_PAGES = {
    "full": "benchmarks.md",
    "full-cpu-converged": "benchmarks.md",
    "full-cpu": "benchmarks_full_cpu.md",
    "full-cpu-memory": "benchmarks_task_memory.md",
    "full-cpu-centred": "benchmarks_task_memory_centred.md",
    "gemma3": "benchmarks_gemma3.md",
}
DESIGN_HISTORY = {  # preset -> what it tried, in the order tried
    "full-cpu": "plain 1-D conv CVAE, 5 checkpoints per domain",
    "full-cpu-memory": "+ task memory (same bank)",
    "full-cpu-converged": "+ 40 checkpoints per domain from a converged tail, LOO on every domain",
    "full-cpu-centred": "+ task memory compares centred conditions (LoRAs retrained; same-cache control: notes)",
}
# preset -> a run of another preset on the same cache (same LoRAs, texts and task vectors), saved under the results
# folder: the report compares the two domain by domain, where runs of two environments would differ in their LoRAs too
SAME_CACHE_CONTROLS = {"full-cpu-centred": "lora_generation_full-cpu-converged_rerun-2026-11-25.json"}
SWEEP_TABLES = {"full-cpu": "generator_sweep_quick.md"}  # design-lever sweeps (benchmarks/generator_sweep.py)
