"""Generator designs side by side on a BIG-bench preset (issues 13 and 14): conv vs factorised, task memory on/off,
canonical form on/off, in one table.

    python benchmarks/design_sweep.py --preset quick [--cache-dir benchmarks/cache]

Runs `benchmarks/bigbench_zero_shot.py`'s pipeline (same selection, LoRAs, conditions and scoring, with its cache
keys, so entries are shared) with `DESIGNS` as the generator variants, lean enough for a shared CPU: description
conditions only, and each design scored on `--seen-tasks` bank tasks and on every held-out task from its own
description (the shuffled and random-string controls are the benchmark's job). Writes
`benchmarks/results/design_sweep_<preset>.json` and `.md`: for each design, generator parameters, training seconds and
final loss, the answer NLL on the seen (bank) tasks next to their own LoRA and checkpoint mean, and the held-out
answer NLL next to the mean-of-bank, nearest-description and top-k controls.

At 4 bank tasks (the quick preset) no design can generalise; what the table can show is whether a design reconstructs
the seen tasks as well as another and what it costs.
"""

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import bigbench_zero_shot  # noqa: E402
from benchmarks.bigbench import pipeline  # noqa: E402
from benchmarks.reporting import markdown_table  # noqa: E402
from peft_cvae.file_utils import write_json  # noqa: E402
from peft_cvae.task_encoding import HiddenStateTaskEncoder  # noqa: E402

ROOT = Path(__file__).resolve().parent
FACTORISED = {"architecture": "factorised", "task_memory_dtype": "bfloat16"}
DESIGNS = {  # variant name -> from_bank overrides on top of the preset's generator_overrides
    "plain": {"task_memory": False},  # conv, no task memory (its cache entries are the benchmark's own)
    "task memory": {"task_memory": True},
    "factorised": {"architecture": "factorised", "task_memory": False},
    "factorised + task memory (bf16)": {**FACTORISED, "task_memory": True},
    "factorised + task memory (bf16) + svd": {**FACTORISED, "task_memory": True, "canonical_form": "svd"},
}


def _mean(values) -> float | None:
    values = [value for value in values if value is not None]
    return statistics.fmean(values) if values else None


def sweep_rows(results: dict) -> list[dict]:
    """One row per (design, condition kind) from a bigbench_zero_shot results dict."""
    rows = []
    for name, entry in results["generators"].items():
        variant, kind = name.rsplit(" / ", 1)
        label = f"generated ({variant}) from {'description' if kind == 'description' else '8 examples'}"
        seen = [scores[label]["answer_nll"] for scores in results["seen"].values() if label in scores]
        own = [scores.get("own LoRA (final)", {}).get("answer_nll") for scores in results["seen"].values()]
        own_mean = [scores.get("own checkpoint mean", {}).get("answer_nll") for scores in results["seen"].values()]
        heldout = results["heldout"].values()
        row = {
            "design": variant,
            "kind": kind,
            "overrides": DESIGNS.get(variant),
            "parameters": entry.get("parameters"),
            "train_seconds": entry.get("train_seconds"),
            "final_loss": entry.get("final_loss"),
            "seen_answer_nll": _mean(seen),
            "seen_own_lora_nll": _mean(own),
            "seen_own_checkpoint_mean_nll": _mean(own_mean),
            "heldout_answer_nll": _mean(scores.get(label, {}).get("answer_nll") for scores in heldout),
            "heldout_shuffled_nll": _mean(
                scores.get(f"{label}, shuffled", {}).get("answer_nll") for scores in heldout
            ),
            "heldout_random_string_nll": _mean(
                scores.get(f"{label}, random string", {}).get("answer_nll") for scores in heldout
            ),
        }
        rows.append(row)
    return rows


def controls(results: dict) -> dict:
    """Held-out answer NLL of the controls (mean over held-out tasks)."""
    names = {name for scores in results["heldout"].values() for name in scores if not name.startswith("generated")}
    return {
        name: _mean(scores.get(name, {}).get("answer_nll") for scores in results["heldout"].values())
        for name in sorted(names)
    }


def markdown(sweep: dict) -> str:
    def fmt(value, spec=".4f"):
        return "—" if value is None else format(value, spec)

    reference = {
        row["kind"]: row["seen_answer_nll"] for row in sweep["rows"] if row["design"] == "task memory"
    }  # the old design's best: conv + task memory
    cells = []
    for row in sweep["rows"]:
        base = reference.get(row["kind"])
        ratio = row["seen_answer_nll"] / base if base and row["seen_answer_nll"] is not None else None
        cells.append(
            [
                row["design"],
                row["kind"],
                fmt(row["parameters"], ","),
                fmt(row["train_seconds"], ".0f"),
                fmt(row["final_loss"]),
                fmt(row["seen_answer_nll"]),
                fmt(ratio),
                fmt(row["heldout_answer_nll"]),
            ]
        )
    header = [
        "design",
        "condition",
        "parameters",
        "train s",
        "final loss",
        "seen NLL",
        "seen NLL / conv + memory",
        "held-out NLL",
    ]
    control_lines = "\n".join(f"- {name}: {fmt(value)}" for name, value in sweep["controls"].items())
    own = _mean(row["seen_own_lora_nll"] for row in sweep["rows"])
    own_mean = _mean(row["seen_own_checkpoint_mean_nll"] for row in sweep["rows"])
    intro = (
        f"Answer NLL per answer token (lower is better), z = 0, on {sweep['seen_tasks']} seen (bank) task(s) and "
        f"{sweep['heldout_tasks']} held-out task(s) of {sweep['bank_tasks']} bank tasks; on the seen tasks their own "
        f"final LoRA scores {fmt(own)} and the mean of their own checkpoints {fmt(own_mean)} (what task memory "
        "stores). *seen NLL / conv + memory* compares each design with the old design's best (conv + task memory) "
        "under the same condition kind. At this bank size no design generalises: the held-out columns say which "
        "controls a design resembles, not how a generator would do at 100+ tasks."
    )
    return f"""# Generator designs on the BIG-bench `{sweep["preset"]}` preset

Generated by `python benchmarks/design_sweep.py --preset {sweep["preset"]}` from
`benchmarks/results/design_sweep_{sweep["preset"]}.json`; do not edit by hand.

{intro}

{markdown_table(header, cells)}

Held-out controls (mean answer NLL):
{control_lines}
"""


def run(preset: str, cache: Path, seen_tasks: int, designs: list[str], save=None) -> dict:
    """The benchmark's pipeline, lean: description conditions only, the designs scored on `seen_tasks` bank tasks and
    on every held-out task from its own description (no shuffled or random-string runs). Cache keys are the
    benchmark's own, so its cached LoRAs, generators and scores are reused and vice versa."""
    settings = bigbench_zero_shot.PRESETS[preset]
    torch.manual_seed(0)
    base, tokenizer, text_encoder = bigbench_zero_shot.load_models(settings, cache)
    hidden_encoder = HiddenStateTaskEncoder(base, tokenizer, max_length=settings.rules.max_tokens)
    selection, _ = bigbench_zero_shot.load_selection(settings, cache, tokenizer)
    tasks, split = selection["tasks"], selection["split"]
    bank_tasks = [tasks[path] for path in split["train"]]
    heldout = [tasks[path] for path in split["heldout"]]
    randoms = {
        f"random:{task.name}": bigbench_zero_shot.random_string(f"{settings.split_seed}/{task.name}")
        for task in heldout
    }
    vectors = pipeline.conditions(text_encoder, hidden_encoder, bank_tasks + heldout, randoms, settings, cache)
    bank_loras = pipeline.task_loras(base, tokenizer, bank_tasks, settings, cache, what="bank")
    names = [task.name for task in bank_tasks]
    descriptions = {task.name: task.description for task in bank_tasks}
    bank = pipeline.condition_bank(bank_loras, vectors["description"], text_encoder.to_dict(), descriptions)
    variants = {name: DESIGNS[name] for name in designs}
    generators = pipeline.train_generators({"description": bank}, settings, cache, variants)
    lora_key = settings.key(pipeline.LORA_FIELDS)
    bank_means = torch.stack([pipeline.mean_vector(bank_loras[name]["bank"]) for name in names])  # (T, N)
    description_keys = torch.stack([vectors["description"][name] for name in names])
    bank_id = settings.key((), lora_key, names)
    scorer = pipeline.Scorer(base, tokenizer, bank.layout, settings, cache)
    results = {"seen": {}, "heldout": {}, "generators": {}}
    for (kind, variant), entry in generators.items():
        generator = entry["generator"]
        results["generators"][f"{variant} / {kind}"] = {
            **{k: v for k, v in entry.items() if k != "generator"},
            "generator_numel_with_buffers": sum(t.numel() for t in generator.state_dict().values()),
            "generator_bytes": sum(t.numel() * t.element_size() for t in generator.state_dict().values()),
        }
    for role, chosen in (("seen", bank_tasks[:seen_tasks]), ("heldout", heldout)):
        for task in chosen:
            candidates = {"base": ("base", None)}
            if role == "seen":
                index = names.index(task.name)
                candidates["own LoRA (final)"] = (lora_key, pipeline.final_vector(bank_loras[task.name]["bank"]))
                candidates["own checkpoint mean"] = (lora_key + "-mean", bank_means[index])
            else:
                nearest, mix, weights = pipeline.similarity_mix(
                    vectors["description"][task.name],
                    description_keys,
                    bank_means,
                    settings.top_k,
                    settings.top_k_temperature,
                )
                candidates["mean of bank LoRAs"] = (bank_id, bank_means.mean(dim=0))
                candidates["nearest description"] = (settings.key((), bank_id, names[nearest]), bank_means[nearest])
                candidates["top-k mix"] = (
                    settings.key((), bank_id, settings.top_k, settings.top_k_temperature, weights),
                    mix,
                )
            for (kind, variant), entry in generators.items():
                vector = pipeline.generated_vector(entry["generator"], vectors[kind][task.name])
                key = settings.key((), entry["key"], task.name)
                candidates[bigbench_zero_shot.generated_label(variant, kind)] = (key, vector)
            results[role][task.name] = {
                label: scorer.score(task, label, key, vector) for label, (key, vector) in candidates.items()
            }
            print(role, task.name, {k: round(v["answer_nll"], 4) for k, v in results[role][task.name].items()})
            if save is not None:  # after every task: a long run stopped early keeps what it scored
                save({**results, "split": split})
    results["split"] = split
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "cache")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "results")
    parser.add_argument("--seen-tasks", type=int, default=1, help="bank tasks scored (each costs a scoring pass)")
    parser.add_argument("--designs", nargs="*", default=list(DESIGNS), choices=list(DESIGNS), help="names of DESIGNS")
    args = parser.parse_args(argv)

    def save(results: dict) -> dict:
        sweep = {
            "preset": args.preset,
            "bank_tasks": len(results["split"]["train"]),
            "heldout_tasks": len(results["heldout"]),
            "seen_tasks": len(results["seen"]),
            "rows": sweep_rows(results),
            "controls": controls(results),
            "scores": {"seen": results["seen"], "heldout": results["heldout"]},
        }
        args.output_dir.mkdir(parents=True, exist_ok=True)
        write_json(sweep, args.output_dir / f"design_sweep_{args.preset}.json")
        (args.output_dir / f"design_sweep_{args.preset}.md").write_text(markdown(sweep), encoding="utf-8")
        return sweep

    sweep = save(run(args.preset, args.cache_dir, args.seen_tasks, args.designs, save))
    print(markdown(sweep))
    return sweep


if __name__ == "__main__":
    main()
