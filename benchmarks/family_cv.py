"""Family cross-validation on cached BIG-bench bank LoRAs (issue 13): does a generator trained with its own task hidden
from the task memory (`memory_holdout`) correct the neighbours' mix better than retrieval and the top-k mix?

    python benchmarks/family_cv.py --preset full --cache-dir /work/main/benchmarks/cache \
        --work-dir benchmarks/cache/family_cv --folds 4 --max-tasks 12 --scored-test-examples 20

Uses ONLY the bank (training) tasks of the preset's split whose LoRAs are already cached under `--cache-dir` (read
only: nothing is trained or written there, and no held-out family is touched: issue 12 forbids tuning on them).
They are grouped by family and the families dealt into `--folds` folds (largest family first, into the fold with the
fewest tasks; ties broken by a seeded shuffle). For each fold, the other folds' tasks form the bank
(`pipeline.condition_bank`, description conditions), every design of `DESIGNS` is trained on it with the preset's
generator settings, and each fold task is scored as an unseen task:

- in parameter space, for every fold task (free): the squared distance of each candidate to the task's own checkpoint
  mean, relative to that of the mean of the bank LoRAs, and the cosine between (candidate - bank mean) and
  (own mean - bank mean), i.e. whether it moves from the soup towards the task;
- by answer NLL (and multiple-choice accuracy) on `--scored-test-examples` test examples, for at most `--max-tasks`
  fold tasks (interleaved across folds), with `pipeline.Scorer` and its atomic per-score cache under `--work-dir`.

Candidates: base, oracle (the task's own final LoRA), own checkpoint mean, mean of the bank LoRAs, nearest-description
retrieval, the top-k mix (`pipeline.similarity_mix` with the preset's top_k / temperature), and the generators at
z = 0. Writes `benchmarks/results/family_cv_<preset>.json` and `docs/benchmarks_family_cv_<preset>.md` after every
task.
"""

import argparse
import random
import statistics
import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from benchmarks import bigbench_zero_shot  # noqa: E402
from benchmarks.bigbench import pipeline  # noqa: E402
from benchmarks.bigbench.presets import LORA_FIELDS  # noqa: E402
from benchmarks.reporting import markdown_table  # noqa: E402
from peft_cvae import LoraBank  # noqa: E402
from peft_cvae.file_utils import read_json, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent
DESIGNS = {  # generator label -> from_bank overrides on top of the preset's generator_overrides
    "task memory": {"task_memory": True},
    "task memory + holdout 0.5": {"task_memory": True, "memory_holdout": 0.5},
    "task memory + holdout 1.0": {"task_memory": True, "memory_holdout": 1.0},
    "factorised + task memory + holdout 0.5": {
        "architecture": "factorised",
        "task_memory": True,
        "task_memory_dtype": "bfloat16",
        "memory_holdout": 0.5,
    },
}
DEFAULT_DESIGNS = list(DESIGNS)[:3]
DOCS_PAGE = "benchmarks_family_cv_{preset}.md"
CONTROLS = ("base", "oracle", "own checkpoint mean", "mean of bank LoRAs", "nearest description", "top-k mix")


def cached_bank_tasks(settings, cache: Path, tokenizer) -> list:
    """The split's bank tasks whose LoRA is complete in the cache (its summary.json written last), in split order."""
    selection, _ = bigbench_zero_shot.load_selection(settings, cache, tokenizer)
    folder = cache / "loras" / settings.key(LORA_FIELDS)
    tasks = [selection["tasks"][path] for path in selection["split"]["train"]]
    return [task for task in tasks if (folder / task.name / "summary.json").is_file()]


def assign_folds(tasks: list, folds: int, seed: int = 0) -> dict[str, int]:
    """{task name: fold}: whole families per fold, largest family first into the fold with the fewest tasks."""
    families = {}
    for task in tasks:
        families.setdefault(task.family, []).append(task.name)
    order = sorted(families)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda family: -len(families[family]))  # stable: the shuffle breaks ties
    sizes, assignment = [0] * folds, {}
    for family in order:
        fold = min(range(folds), key=lambda index: (sizes[index], index))
        sizes[fold] += len(families[family])
        assignment.update((name, fold) for name in families[family])
    return assignment


def description_vectors(text_encoder, tasks: list, work: Path) -> dict[str, torch.Tensor]:
    """MiniLM description vectors (the pipeline's encoder), cached in the work folder."""
    path = work / "conditions" / f"{text_encoder.to_dict().get('name_or_path', 'encoder').replace('/', '_')}.json"
    stored = read_json(path) if path.is_file() else {}
    missing = [task for task in tasks if task.name not in stored]
    for task in missing:
        stored[task.name] = text_encoder.encode(task.description).tolist()
    if missing:
        pipeline.save_json(stored, path)
    return {name: torch.tensor(vector) for name, vector in stored.items()}


def last_checkpoints(bank: LoraBank, args) -> LoraBank:
    """The bank itself, or (`--checkpoints-per-task k`) a bank of its last k checkpoints: a cheaper generator
    training on a shared CPU, used for every candidate alike (own mean, task memory, retrieval)."""
    if not args.checkpoints_per_task or len(bank) <= args.checkpoints_per_task:
        return bank
    kept = LoraBank(bank.layout, condition_encoder=bank.condition_encoder)
    for checkpoint in bank.checkpoints[-args.checkpoints_per_task :]:
        kept.add_checkpoint(checkpoint.task, checkpoint.state_dict, step=checkpoint.step)
    return kept


def parameter_metrics(vector: torch.Tensor, own: torch.Tensor, soup: torch.Tensor) -> dict:
    """Distance of `vector` to the task's own checkpoint mean relative to the bank mean's, and the cosine between
    (vector - soup) and (own - soup): > 0 moves from the soup towards the task."""
    relative = ((vector - own).pow(2).sum() / (soup - own).pow(2).sum()).item()
    cosine = torch.nn.functional.cosine_similarity((vector - soup)[None], (own - soup)[None]).item()
    return {"relative_sq_distance": relative, "cosine_to_own": cosine if (vector - soup).norm() > 0 else 0.0}


def run(args, save) -> dict:
    settings = bigbench_zero_shot.PRESETS[args.preset]
    settings = replace(
        settings,
        scored_test_examples=args.scored_test_examples or settings.scored_test_examples,
        generator_epochs=args.generator_epochs or settings.generator_epochs,
    )
    torch.manual_seed(0)
    base, tokenizer, text_encoder = bigbench_zero_shot.load_models(settings, args.cache_dir)
    tasks = cached_bank_tasks(settings, args.cache_dir, tokenizer)
    folds = assign_folds(tasks, args.folds, args.fold_seed)
    by_name = {task.name: task for task in tasks}
    lora_folder = args.cache_dir / "loras" / settings.key(LORA_FIELDS)
    loras = {
        task.name: {"bank": last_checkpoints(LoraBank.from_pretrained(lora_folder / task.name / "bank"), args)}
        for task in tasks
    }
    own_means = {name: pipeline.mean_vector(entry["bank"]) for name, entry in loras.items()}
    vectors = description_vectors(text_encoder, tasks, args.work_dir)
    work = args.work_dir / f"checkpoints-{args.checkpoints_per_task or 'all'}"  # generators and scores of this bank
    per_fold = [[task.name for task in tasks if folds[task.name] == fold] for fold in range(args.folds)]
    # Scored tasks: the cheapest to score of each fold first (shortest test examples), folds interleaved, so that a
    # CPU-bound run stopped early has scored a balanced set. The order depends on the text lengths only.
    cost = {task.name: sum(len(e.input) + len(e.target) for e in task.splits["test"][:32]) for task in tasks}
    by_cost = [sorted(names, key=lambda name: (cost[name], name)) for names in per_fold]
    interleaved = [names[i] for i in range(max(map(len, by_cost))) for names in by_cost if i < len(names)]
    scored = interleaved[: args.max_tasks]
    lora_key = settings.key(LORA_FIELDS)
    results = {
        "preset": args.preset,
        "settings": {
            "folds": args.folds,
            "fold_seed": args.fold_seed,
            "max_tasks": args.max_tasks,
            "generator_epochs": settings.generator_epochs,
            "checkpoints_per_task": args.checkpoints_per_task,
        },
        "scored_test_examples": settings.scored_test_examples,
        "designs": {name: DESIGNS[name] for name in args.designs},
        "tasks": {task.name: {"family": task.family, "fold": folds[task.name]} for task in tasks},
        "generators": {},
        "parameters": {},
        "scores": {},
    }
    variants = {name: DESIGNS[name] for name in args.designs}
    to_score = {}  # task -> its candidates {label: (cache key, vector)}, for the scoring pass after all folds
    for fold in range(args.folds):
        names = [task.name for task in tasks if folds[task.name] != fold]
        if not per_fold[fold] or len(names) < 2:
            continue
        descriptions = {name: by_name[name].description for name in names}
        bank = pipeline.condition_bank(
            {name: loras[name] for name in names}, vectors, text_encoder.to_dict(), descriptions
        )
        generators = pipeline.train_generators({"description": bank}, settings, work, variants)
        for (_, variant), entry in generators.items():
            results["generators"][f"fold {fold} / {variant}"] = {k: v for k, v in entry.items() if k != "generator"}
        means = torch.stack([own_means[name] for name in names])  # (T, N)
        soup = means.mean(dim=0)
        keys = torch.stack([vectors[name] for name in names])
        bank_id = settings.key((), lora_key, names)
        for name in tqdm(per_fold[fold], desc=f"fold {fold + 1}/{args.folds}"):
            nearest, mix, weights = pipeline.similarity_mix(
                vectors[name], keys, means, settings.top_k, settings.top_k_temperature
            )
            candidates = {
                "base": ("base", None),
                "oracle": (lora_key, pipeline.final_vector(loras[name]["bank"])),
                "own checkpoint mean": (f"{lora_key}-mean{args.checkpoints_per_task}", own_means[name]),
                "mean of bank LoRAs": (bank_id, soup),
                "nearest description": (settings.key((), bank_id, names[nearest]), means[nearest]),
                "top-k mix": (settings.key((), bank_id, settings.top_k, settings.top_k_temperature, weights), mix),
            }
            for (_, variant), entry in generators.items():
                vector = pipeline.generated_vector(entry["generator"], vectors[name])
                candidates[f"generated ({variant})"] = (settings.key((), entry["key"], name), vector)
            results["parameters"][name] = {
                label: parameter_metrics(vector, own_means[name], soup)
                for label, (_, vector) in candidates.items()
                if vector is not None
            }
            results["parameters"][name]["nearest task"] = names[nearest]
            if name in scored:  # the own checkpoint mean only in parameter space: the oracle stands for it
                del candidates["own checkpoint mean"]
                order = [label for label in candidates if label != "mean of bank LoRAs"] + ["mean of bank LoRAs"]
                to_score[name] = {label: candidates[label] for label in order}
            save(results)
    if scored:  # answer NLL, one score at a time, saved after each: a run stopped early keeps what it scored
        scorer = pipeline.Scorer(base, tokenizer, bank.layout, settings, work)
        for name in tqdm(scored, desc="scoring fold tasks"):
            results["scores"][name] = {}
            for label, (key, vector) in to_score[name].items():
                score = scorer.score(by_name[name], label, key, vector)
                results["scores"][name][label] = {k: v for k, v in score.items() if k != "example_nll"}
                save(results)
            print(name, {k: round(v["answer_nll"], 3) for k, v in results["scores"][name].items()}, flush=True)
    return results


# ---- summary and report --------------------------------------------------------------------------------------------
def _mean(values):
    values = [value for value in values if value is not None]
    return statistics.fmean(values) if values else None


def summarise(results: dict) -> dict:
    """Per candidate: mean answer NLL and accuracy over the scored tasks that have it, the share of the oracle's gain
    recovered (of the averages over those tasks, and the per-task median), wins against nearest-description retrieval
    and the top-k mix, and the parameter-space means over every fold task."""
    scores, parameters = results["scores"], results["parameters"]
    labels = []
    for entry in [*scores.values(), *parameters.values()]:
        labels += [label for label in entry if label not in labels and label != "nearest task"]
    summary = {}
    for label in labels:
        have = [s for s in scores.values() if label in s and "base" in s and "oracle" in s]
        nll = [s[label]["answer_nll"] for s in have]
        row = {
            "answer_nll": _mean(nll),
            "tasks_scored": len(nll),
            "accuracy": _mean(s[label].get("accuracy") for s in have),
        }
        base = _mean(s["base"]["answer_nll"] for s in have)
        oracle = _mean(s["oracle"]["answer_nll"] for s in have)
        if nll and base != oracle:
            row["recovered_of_average"] = (base - row["answer_nll"]) / (base - oracle)
            shares = [
                (s["base"]["answer_nll"] - s[label]["answer_nll"])
                / (s["base"]["answer_nll"] - s["oracle"]["answer_nll"])
                for s in have
                if s["base"]["answer_nll"] != s["oracle"]["answer_nll"]
            ]
            row["recovered_median"] = statistics.median(shares) if shares else None
        for control in ("nearest description", "top-k mix"):
            both = [s for s in have if control in s]
            row[f"wins vs {control}"] = sum(s[label]["answer_nll"] < s[control]["answer_nll"] for s in both)
            row[f"compared with {control}"] = len(both)
        row["relative_sq_distance"] = _mean(
            p[label]["relative_sq_distance"] for p in parameters.values() if label in p
        )
        row["cosine_to_own"] = _mean(p[label]["cosine_to_own"] for p in parameters.values() if label in p)
        row["tasks_in_parameter_space"] = sum(label in p for p in parameters.values())
        summary[label] = row
    return summary


def markdown(results: dict) -> str:
    def fmt(value, spec=".3f"):
        return "—" if value is None else format(value, spec)

    summary = results["summary"]
    folds = results["settings"]["folds"]
    families = {info["family"] for info in results["tasks"].values()}
    header = ["candidate", "answer NLL", "accuracy", "recovered (of avg)", "recovered (median)", "wins vs nearest",
              "wins vs top-k", "param dist / soup", "cos to own"]  # fmt: skip
    scored = len(results["scores"])
    rows = []
    for label, row in summary.items():
        wins = [f"{row[f'wins vs {c}']}/{row[f'compared with {c}']}" for c in ("nearest description", "top-k mix")]
        rows.append(
            [label, fmt(row["answer_nll"]), fmt(row["accuracy"]), fmt(row.get("recovered_of_average")),
             fmt(row.get("recovered_median")), *wins, fmt(row["relative_sq_distance"]), fmt(row["cosine_to_own"])]
        )  # fmt: skip
    trained = [
        [name, fmt(entry.get("train_seconds"), ".0f"), fmt(entry.get("first_loss"), ".4f"),
         fmt(entry.get("final_loss"), ".4f")]
        for name, entry in results["generators"].items()
    ]  # fmt: skip
    unscored = (
        "\nNo fold task was scored by answer NLL in this run (it was stopped before the first score finished on a"
        " shared CPU): the NLL columns are empty and the verdict rests on the parameter-space columns.\n"
        if not scored
        else ""
    )
    return f"""# Family cross-validation of the task-memory generator on BIG-bench bank tasks (issue 13)

Generated by `python benchmarks/family_cv.py --preset {results["preset"]}` from
`benchmarks/results/family_cv_{results["preset"]}.json`; do not edit by hand.

The question: does training with each sample's own task hidden from the task memory (`memory_holdout`, leave-one-
task-out) teach the decoder to correct a mix of *other* tasks, so that an unseen task gets more than a similarity mix?
Only bank (training) tasks of the `{results["preset"]}` split whose LoRAs were already cached are used
({len(results["tasks"])} tasks of {len(families)} families), dealt by family into {folds} folds; no held-out family is
touched. Each fold's tasks are unseen by the generators trained on the other folds. Conditions: descriptions (MiniLM).
Answer NLL per answer token (lower is better) on {results["scored_test_examples"]} test examples of {scored} fold
task(s); accuracy is multiple-choice accuracy where a task is multiple choice. *Recovered* is
`(base - x) / (base - oracle)`; *param dist / soup* is the squared distance to the task's own checkpoint mean divided
by that of the mean of the bank LoRAs, and *cos to own* the cosine between (x - bank mean) and (own mean - bank mean),
both averaged over all {len(results["parameters"])} fold tasks.

{markdown_table(header, rows)}
{unscored}
Generators (fold / design: training seconds, first and final epoch loss):

{markdown_table(["generator", "train s", "first loss", "final loss"], trained)}
"""


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="full")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "cache", help="read only: cached LoRAs, selection")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "cache" / "family_cv", help="generators, scores")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "results")
    parser.add_argument("--docs-dir", type=Path, default=ROOT.parent / "docs")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--fold-seed", type=int, default=0)
    parser.add_argument("--max-tasks", type=int, default=12, help="fold tasks scored by NLL (each costs passes)")
    parser.add_argument("--scored-test-examples", type=int, default=None, help="default: the preset's")
    parser.add_argument("--designs", nargs="*", default=DEFAULT_DESIGNS, choices=list(DESIGNS))
    parser.add_argument("--generator-epochs", type=int, default=None, help="default: the preset's")
    parser.add_argument(
        "--checkpoints-per-task", type=int, default=None, help="use each task's last k checkpoints (default: all)"
    )
    args = parser.parse_args(argv)
    if args.folds < 2:
        parser.error("--folds must be at least 2")

    def save(results: dict) -> None:
        results["summary"] = summarise(results)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        write_json(results, args.output_dir / f"family_cv_{args.preset}.json")
        args.docs_dir.mkdir(parents=True, exist_ok=True)
        (args.docs_dir / DOCS_PAGE.format(preset=args.preset)).write_text(markdown(results), encoding="utf-8")

    results = run(args, save)
    save(results)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
