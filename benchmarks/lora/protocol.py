"""The benchmark's protocol (DESIGN.md §6): seen domains with memorisation controls, unseen domains (leave one
out), fusion of two domains, and cost; `run` does all of it and returns the JSON-ready results."""

import copy
import inspect
import tempfile
import time
from pathlib import Path

import torch
from peft import get_peft_model
from tqdm.auto import tqdm

from peft_cvae import LoraBank

from ..caching import peak_rss_mb
from .bank import build_checkpoint_bank, conditioned, trained_generator
from .domains import describe, load_base, task_vectors
from .scoring import Scorer, average_loras, best_of_k, checkpoint_geometry, memorisation, recovery, task_rows
from .settings import CONDITION_KINDS, Settings
from .targets import targets


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
    own_means = {name: layout.unflatten(vectors[task_rows(tasks, name)].mean(0)) for name in domains}
    soup = average_loras(layout, list(finals.values()))
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
            "model soup of the other domains": scorer.score(average_loras(layout, [finals[o] for o in rest]), name),
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
            candidates["generated, combine=parameters"] = average_loras(layout, pair, weights)
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
        "peak_rss_mb": peak_rss_mb(),
        "generator_training_peak_rss_growth_mb": {k: s["peak_rss_growth_mb"] for k, s in training.items()},
        "generator_training_peak_cuda_mb": {k: s["peak_cuda_mb"] for k, s in training.items()},
    }
