"""Benchmark: ICM-LoRA's Tables 2 and 3 in miniature, with memorisation controls and unseen tasks.

    python benchmarks/lora_generation.py --preset quick     # 3 domains, small settings (< 15 min on 2 CPU cores)
    python benchmarks/lora_generation.py --preset full      # 7 domains (DESIGN.md §6 protocol)
    python benchmarks/lora_generation.py --preset tiny      # tiny Llama, synthetic domains: the test-suite smoke run

For every domain a LoRA (r=8 on q_proj, v_proj of SmolLM2-135M) is fine-tuned with a learning rate that decays to 0,
and its checkpoints of the last part of training go into one bank. One generator is trained on all domains with task
descriptions as conditions (all-MiniLM-L6-v2). On held-out text of each domain we score perplexity and bits per
character for: the base model, the original (final) LoRA, the generated LoRA (mean z = 0, and best of k samples chosen
on the validation split), a model soup (uniform average of all domains' final LoRAs), PEFT's TIES merge of them, the
training checkpoint nearest to the generated LoRA, that checkpoint plus Gaussian noise of the same norm as the
generated LoRA's distance to it, and the LoRA generated from another domain's condition (shuffled condition).
Leave-one-domain-out runs train a generator without one domain and generate it from its description.

Intermediate artefacts (converted base model, each domain's checkpoints, generators) are cached under --cache-dir, so a
rerun only redoes what changed. Results: JSON under benchmarks/results/, a markdown report (docs/benchmarks.md for the
full preset) and a PNG of per-domain perplexity by method.
"""

import argparse
import copy
import hashlib
import json
import math
import platform
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm

from peft_cvae import LoraBank, LoraLayout, PeftCVAEGenerator, train_generator
from peft_cvae.evaluation import evaluate_language_model
from peft_cvae.file_utils import atomic_directory, write_json

ROOT = Path(__file__).resolve().parent


@dataclass
class Settings:
    """Everything that determines the results; its hash names the cache entries."""

    domains: list[str]
    lora_steps: int = 120
    keep_last: int = 40  # checkpoints of the last `keep_last` steps go into the bank
    save_every: int = 5
    batch_size: int = 8
    max_length: int = 128
    lr: float = 2e-4
    train_texts: int = 400
    eval_texts: int = 40
    eval_max_length: int = 128
    generator_epochs: int = 300
    generator_lr: float = 1e-3
    generator_overrides: dict = field(default_factory=lambda: {"hidden_channels": 64, "num_layers": 6})
    best_of_k: int = 4
    leave_one_out: list[str] = field(default_factory=list)
    tiny: bool = False
    seed: int = 0

    def key(self, *parts) -> str:
        text = json.dumps([asdict(self), *parts], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


PRESETS = {
    "full": Settings(
        domains=["business", "entertainment", "politics", "sport", "tech", "python_code", "man_pages"],
        leave_one_out=["business", "entertainment", "politics", "sport", "tech", "python_code", "man_pages"],
    ),
    "quick": Settings(
        domains=["sport", "tech", "python_code"],
        lora_steps=40,
        keep_last=20,
        batch_size=4,
        max_length=96,
        train_texts=120,
        eval_texts=16,
        eval_max_length=96,
        generator_epochs=150,
        generator_overrides={"hidden_channels": 32, "num_layers": 2, "latent_size": 16},
        best_of_k=2,
        leave_one_out=["tech"],
    ),
    "tiny": Settings(
        domains=["ascending", "descending", "repeating"],
        lora_steps=20,
        keep_last=10,
        batch_size=8,
        max_length=16,
        lr=2e-2,
        train_texts=64,
        eval_texts=8,
        eval_max_length=16,
        generator_epochs=60,
        generator_lr=3e-3,
        generator_overrides={"patch_size": 16, "hidden_channels": 32, "latent_size": 8, "num_layers": 2},
        best_of_k=2,
        leave_one_out=["repeating"],
        tiny=True,
    ),
}


# ---- data, base model and task vectors -------------------------------------------------------------------------
def load_base(settings: Settings):
    if settings.tiny:
        sys.path.insert(0, str(ROOT.parent))
        from tests.testing_utils import tiny_llama

        return tiny_llama(), TinyTokenizer()
    from peft_cvae.assets import load_smollm2

    return load_smollm2()


class TinyTokenizer:
    """Space-separated integers <-> token ids, enough for evaluate_language_model on the tiny synthetic domains."""

    pad_token_id = 0
    bos_token_id = 0  # the context token evaluate_language_model puts in front of each text
    eos_token_id = None

    def __call__(self, texts, **kwargs):
        if isinstance(texts, str):
            return {"input_ids": [int(token) for token in texts.split()]}
        return {"input_ids": [[int(token) for token in text.split()] for text in texts]}


def domain_texts(name: str, split: str, settings: Settings) -> list[str]:
    count = settings.train_texts if split == "train" else settings.eval_texts
    if settings.tiny:
        from tests.testing_utils import task_batch

        offset = {"train": 0, "validation": 1, "test": 2}[split]
        tokens = task_batch(name, torch.Generator().manual_seed(offset), batch_size=count, length=settings.max_length)
        return [" ".join(str(int(t)) for t in row) for row in tokens]
    from peft_cvae.assets import load_domain_texts

    return load_domain_texts(name, split, max_chars=4000, max_texts=count)


def describe(name: str) -> str:
    if name in ("ascending", "descending", "repeating"):
        return f"token sequences that follow the {name} pattern"
    from peft_cvae.assets import DOMAINS

    return DOMAINS[name]


def task_vectors(names: list[str], settings: Settings) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Description embeddings (all-MiniLM-L6-v2), or fixed random vectors for the tiny preset."""
    if settings.tiny:
        sys.path.insert(0, str(ROOT.parent))
        from tests.testing_utils import task_conditions

        return {name: task_conditions()[name] for name in names}, None
    from peft_cvae.task_encoding import TextTaskEncoder

    encoder = TextTaskEncoder()
    return {name: encoder.encode(describe(name)) for name in names}, encoder.to_config()


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


def train_domain_lora(base, tokenizer, name: str, settings: Settings) -> list[tuple[int, dict]]:
    """Fine-tune one LoRA (same init for every domain) and return (step, state dict) of its last part of training."""
    torch.manual_seed(settings.seed)
    model = get_peft_model(copy.deepcopy(base), lora_config(settings))
    batches = token_batches(tokenizer, domain_texts(name, "train", settings), settings)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # cosine decay to 0: the kept checkpoints sit on a converged tail
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / settings.lora_steps))
    )
    checkpoints = []
    model.train()
    for step in tqdm(range(1, settings.lora_steps + 1), desc=f"LoRA {name}", leave=False):
        batch = batches[(step - 1) % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not settings.tiny):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step > settings.lora_steps - settings.keep_last and step % settings.save_every == 0:
            checkpoints.append((step, {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}))
    return checkpoints


def build_bank(base, tokenizer, settings: Settings, cache: Path) -> LoraBank:
    """All domains' checkpoints, each domain cached as its own small bank folder."""
    conditions, encoder_config = task_vectors(settings.domains, settings)
    bank = None
    for name in settings.domains:
        folder = cache / f"lora-{name}-{settings.key(name, 'lora')}"
        if not (folder / "bank.json").exists():
            checkpoints = train_domain_lora(base, tokenizer, name, settings)
            config = lora_config(settings)
            config.base_model_name_or_path = getattr(base.config, "_name_or_path", None) or None
            domain_bank = LoraBank(LoraLayout.from_state_dict(checkpoints[0][1], config))
            for step, state in checkpoints:
                domain_bank.add_checkpoint(name, state, step=step)
            domain_bank.save_pretrained(folder)
        domain_bank = LoraBank.from_pretrained(folder)
        if bank is None:
            bank = LoraBank(domain_bank.layout, condition_encoder=encoder_config)
        for checkpoint in domain_bank:
            bank.add_checkpoint(name, checkpoint.state_dict, step=checkpoint.step)
        bank.set_condition(name, conditions[name], description=describe(name))
    return bank


def subset(bank: LoraBank, names: list[str]) -> LoraBank:
    part = LoraBank(bank.layout, condition_encoder=bank.condition_encoder)
    for checkpoint in bank:
        if checkpoint.task in names:
            part.add_checkpoint(checkpoint.task, checkpoint.state_dict, step=checkpoint.step)
    for name in names:
        part.set_condition(name, bank.condition(name), description=bank.description(name))
    return part


def trained_generator(bank: LoraBank, settings: Settings, cache: Path, tag: str) -> tuple[PeftCVAEGenerator, dict]:
    folder = cache / f"generator-{tag}-{settings.key(tag, bank.task_names)}"
    stats_file = folder / "benchmark_training.json"
    if not stats_file.exists():
        generator = PeftCVAEGenerator.from_bank(bank, **settings.generator_overrides)
        start = time.perf_counter()
        history = train_generator(
            generator,
            bank,
            epochs=settings.generator_epochs,
            lr=settings.generator_lr,
            batch_size=8,
            seed=settings.seed,
        )
        stats = {
            "train_seconds": time.perf_counter() - start,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "first_loss": history[0]["loss"],
            "final_loss": history[-1]["loss"],
            "final_reconstruction_loss": history[-1]["reconstruction_loss"],
        }
        with atomic_directory(folder) as staging:
            generator.save_pretrained(staging)
            write_json(stats, staging / "benchmark_training.json")
    generator = PeftCVAEGenerator.from_pretrained(folder).eval()
    return generator, json.loads(stats_file.read_text())


# ---- scoring -------------------------------------------------------------------------------------------------------
class Scorer:
    """One PeftModel over the base; each candidate LoRA is loaded as an adapter, scored, and deleted."""

    def __init__(self, base, tokenizer, layout: LoraLayout, settings: Settings):
        self.model = get_peft_model(copy.deepcopy(base), layout.peft_config(), adapter_name="scratch").eval()
        self.tokenizer, self.layout, self.settings = tokenizer, layout, settings
        self.texts = {}

    def _texts(self, domain: str, split: str) -> list[str]:
        if (domain, split) not in self.texts:
            self.texts[domain, split] = domain_texts(domain, split, self.settings)
        return self.texts[domain, split]

    def score(self, state_dict: dict | None, domain: str, split: str = "test") -> dict:
        dtype = None if self.settings.tiny else torch.bfloat16
        kwargs = {"max_length": self.settings.eval_max_length, "autocast_dtype": dtype}
        if state_dict is None:
            with self.model.disable_adapter():
                return evaluate_language_model(self.model, self.tokenizer, self._texts(domain, split), **kwargs)
        set_peft_model_state_dict(self.model, state_dict, adapter_name="scratch")
        return evaluate_language_model(self.model, self.tokenizer, self._texts(domain, split), **kwargs)

    def ties_merge(self, state_dicts: list[dict]) -> dict:
        """PEFT's TIES merge (density 0.5, uniform weights) of several LoRAs, as a state dict of the same layout."""
        names = []
        for index, state in enumerate(state_dicts):
            name = f"merge_input_{index}"
            self.model.add_adapter(name, self.layout.peft_config())
            set_peft_model_state_dict(self.model, state, adapter_name=name)
            names.append(name)
        weights = [1.0 / len(names)] * len(names)
        self.model.add_weighted_adapter(names, weights, "ties_merge", combination_type="ties", density=0.5)
        merged = get_peft_model_state_dict(self.model, adapter_name="ties_merge")
        for name in [*names, "ties_merge"]:
            self.model.delete_adapter(name)
        self.model.set_adapter("scratch")
        return merged


def flat(layout: LoraLayout, state: dict) -> torch.Tensor:
    return layout.flatten(state)


def run(settings: Settings, cache: Path) -> dict:
    cache.mkdir(parents=True, exist_ok=True)
    base, tokenizer = load_base(settings)
    bank = build_bank(base, tokenizer, settings, cache)
    layout = bank.layout
    generator, training = trained_generator(bank, settings, cache, "all")
    scorer = Scorer(base, tokenizer, layout, settings)
    vectors = bank.vectors()
    tasks = [checkpoint.task for checkpoint in bank]
    finals = {name: bank.checkpoints_of(name)[-1].state_dict for name in settings.domains}
    soup = layout.unflatten(torch.stack([flat(layout, s) for s in finals.values()]).mean(0))
    ties = scorer.ties_merge(list(finals.values()))

    results = {"seen": {}, "distances": {}, "unseen": {}}
    for index, name in enumerate(tqdm(settings.domains, desc="scoring domains")):
        mean_adapter = generator.generate_adapter(name, temperature=0).state_dict
        samples = generator.generate_adapter(name, num_samples=settings.best_of_k, seed=settings.seed)
        samples = samples if isinstance(samples, list) else [samples]
        validation = [scorer.score(s.state_dict, name, "validation")["perplexity"] for s in samples]
        best = samples[min(range(len(samples)), key=validation.__getitem__)].state_dict
        generated = flat(layout, mean_adapter)
        distances = (vectors - generated).norm(dim=1)
        nearest = int(distances.argmin())
        noise = torch.randn(generated.shape, generator=torch.Generator().manual_seed(settings.seed))
        noisy = vectors[nearest] + noise / noise.norm() * distances[nearest]
        other = settings.domains[(index + 1) % len(settings.domains)]
        shuffled = generator.generate_adapter(
            generator.task_conditions[generator.config.task_names.index(other)], temperature=0
        ).state_dict
        candidates = {
            "base": None,
            "original LoRA": finals[name],
            "generated (mean)": mean_adapter,
            f"generated (best of {len(samples)})": best,
            "model soup": soup,
            "TIES merge": ties,
            "nearest checkpoint": layout.unflatten(vectors[nearest]),
            "nearest + noise": layout.unflatten(noisy),
            "shuffled condition": shuffled,
        }
        results["seen"][name] = {method: scorer.score(state, name) for method, state in candidates.items()}
        own = vectors[[i for i, task in enumerate(tasks) if task == name]]
        spread = torch.pdist(own)
        results["distances"][name] = {
            "generated_to_nearest_checkpoint": float(distances[nearest]),
            "nearest_checkpoint_task": tasks[nearest],
            "cosine_to_nearest": float(torch.nn.functional.cosine_similarity(generated, vectors[nearest], dim=0)),
            "generated_to_own_checkpoint_mean": float((generated - own.mean(0)).norm()),
            "own_checkpoint_spread_mean": float(spread.mean()) if len(spread) else 0.0,
            "own_checkpoint_spread_min": float(spread.min()) if len(spread) else 0.0,
        }

    for name in settings.leave_one_out:
        rest = [other for other in settings.domains if other != name]
        held_out_generator, _ = trained_generator(subset(bank, rest), settings, cache, f"without-{name}")
        generated = held_out_generator.generate_adapter(bank.condition(name), temperature=0).state_dict
        rest_soup = layout.unflatten(torch.stack([flat(layout, finals[o]) for o in rest]).mean(0))
        others = {o: scorer.score(finals[o], name)["perplexity"] for o in rest}
        best_other = min(others, key=others.get)
        results["unseen"][name] = {
            "base": scorer.score(None, name),
            "original LoRA (not seen by the generator)": scorer.score(finals[name], name),
            "generated from description": scorer.score(generated, name),
            "model soup of the other domains": scorer.score(rest_soup, name),
            f"best other-domain LoRA ({best_other})": scorer.score(finals[best_other], name),
        }

    results["cost"] = cost(generator, bank, layout, base, training)
    return results


def cost(generator: PeftCVAEGenerator, bank: LoraBank, layout: LoraLayout, base, training: dict) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        generator.save_pretrained(folder / "generator")
        bank.save_pretrained(folder / "bank")
        generator_bytes = (folder / "generator" / "model.safetensors").stat().st_size
        bank_bytes = sum(p.stat().st_size for p in (folder / "bank" / "checkpoints").iterdir())
        task = bank.task_names[0]
        timings = {"generate": [], "load": []}
        model = get_peft_model(copy.deepcopy(base), layout.peft_config(), adapter_name="warmup")
        for repeat in range(5):
            start = time.perf_counter()
            generator.generate_adapter(task, seed=repeat).save_pretrained(folder / f"adapter-{repeat}")
            timings["generate"].append(time.perf_counter() - start)
            start = time.perf_counter()
            model.load_adapter(folder / f"adapter-{repeat}", adapter_name=f"a{repeat}")
            timings["load"].append(time.perf_counter() - start)
    median = {key: sorted(values)[len(values) // 2] for key, values in timings.items()}
    return {
        "generator_bytes": generator_bytes,
        "bank_bytes": bank_bytes,
        "generator_over_bank": generator_bytes / bank_bytes,
        "checkpoints_in_bank": len(bank),
        "generator_parameters": generator.num_parameters(),
        "generate_and_save_seconds_median": median["generate"],
        "peft_load_adapter_seconds_median": median["load"],
        "generate_over_load": median["generate"] / median["load"],
        **training,
    }


# ---- report --------------------------------------------------------------------------------------------------------
def markdown(results: dict, settings: Settings, command: str) -> str:
    lines = ["# Benchmark: generated LoRAs vs originals, merges and controls", ""]
    lines += [
        f"Command: `{command}`",
        "",
        f"Machine: {platform.platform()}, {torch.get_num_threads()} threads, torch {torch.__version__}.",
        "",
    ]
    for section, title in (("seen", "Seen domains"), ("unseen", "Unseen domains (leave one out)")):
        if not results[section]:
            continue
        lines += [f"## {title}: perplexity (bits per character)", ""]
        for name, methods in results[section].items():
            lines += [
                f"### {name}",
                "",
                "| method | perplexity | bits/char | ratio to original LoRA |",
                "|---|---|---|---|",
            ]
            reference = next((v["perplexity"] for k, v in methods.items() if k.startswith("original LoRA")), None)
            for method, scores in methods.items():
                ratio = f"{scores['perplexity'] / reference:.4f}" if reference else "-"
                lines.append(
                    f"| {method} | {scores['perplexity']:.3f} | {scores['bits_per_character']:.4f} | {ratio} |"
                )
            lines.append("")
    lines += [
        "## Memorisation: distance of the generated (mean) LoRA to the training checkpoints",
        "",
        "| domain | L2 to nearest checkpoint | its task | cosine | L2 to own checkpoint mean "
        "| own spread (mean / min) |",
        "|---|---|---|---|---|---|",
    ]
    for name, d in results["distances"].items():
        lines.append(
            f"| {name} | {d['generated_to_nearest_checkpoint']:.3f} | {d['nearest_checkpoint_task']} | "
            f"{d['cosine_to_nearest']:.4f} | {d['generated_to_own_checkpoint_mean']:.3f} | "
            f"{d['own_checkpoint_spread_mean']:.3f} / {d['own_checkpoint_spread_min']:.3f} |"
        )
    cost_ = results["cost"]
    lines += ["", "## Cost", "", "| figure | value |", "|---|---|"]
    lines += [
        f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
        for key, value in cost_.items()
    ]
    lines += ["", "Settings:", "", "```json", json.dumps(asdict(settings), indent=1), "```", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'peft-cvae[plots]').")
        return
    domains = list(results["seen"])
    methods = list(next(iter(results["seen"].values())))
    figure, axis = plt.subplots(figsize=(max(6, 1.8 * len(domains)), 4))
    width = 0.8 / len(methods)
    for m, method in enumerate(methods):
        values = [results["seen"][d][method]["perplexity"] for d in domains]
        axis.bar([i + m * width for i in range(len(domains))], values, width, label=method)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(domains))], domains)
    axis.set_ylabel("held-out perplexity")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--quick", action="store_true", help="alias of --preset quick")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "cache")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "results")
    parser.add_argument(
        "--report", type=Path, default=None, help="markdown report path (full preset: docs/benchmarks.md)"
    )
    args = parser.parse_args(argv)
    preset = "quick" if args.quick else args.preset
    settings = PRESETS[preset]
    command = "python benchmarks/lora_generation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    results = run(settings, args.cache_dir)
    results["wall_seconds"] = time.perf_counter() - start
    results["settings"] = asdict(settings)
    results["command"] = command
    results["versions"] = {"torch": torch.__version__, "python": platform.python_version()}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_directory(args.output_dir) as staging:
        write_json(results, staging / f"lora_generation_{preset}.json")
    report = args.report or (
        ROOT.parent / "docs" / "benchmarks.md"
        if preset == "full"
        else args.output_dir / f"lora_generation_{preset}.md"
    )
    report.write_text(markdown(results, settings, command), encoding="utf-8")
    plot(results, args.output_dir / f"lora_generation_{preset}.png")
    print(markdown(results, settings, command))
    return results


if __name__ == "__main__":
    main()
