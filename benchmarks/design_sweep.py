"""Generator designs side by side on a BIG-bench preset (issues 13 and 14): conv vs factorised, task memory on/off,
canonical form on/off, in one table.

    python benchmarks/design_sweep.py --preset quick [--cache-dir benchmarks/cache]

Runs `benchmarks/bigbench_zero_shot.py`'s pipeline (same selection, LoRAs, conditions, controls and scoring, all
cached) with `DESIGNS` as its generator variants instead of its default two, writes that run's own JSON and report
under `--work-dir`, then the sweep: `benchmarks/results/design_sweep_<preset>.json` and `.md`. For each design and
condition kind: generator parameters and file bytes, training seconds and final loss, the answer NLL on the seen
(bank) tasks next to the bank task's own LoRA, and the held-out answer NLL from the description / examples, shuffled
and random-string conditions, next to the mean-of-bank and best control.

At 4 bank tasks (the quick preset) no design can generalise; what the table can show is whether a design reconstructs
the seen tasks as well as another and what it costs.
"""

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bigbench_zero_shot  # noqa: E402
from benchmarks.bigbench import pipeline  # noqa: E402
from benchmarks.reporting import markdown_table  # noqa: E402
from peft_cvae.file_utils import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent
FACTORISED = {"architecture": "factorised", "task_memory_dtype": "bfloat16"}
DESIGNS = {  # variant name -> from_bank overrides on top of the preset's generator_overrides
    "plain": {},  # today's default: conv, no task memory (its cache entries are the benchmark's own)
    "task memory": {"task_memory": True},
    "factorised": {"architecture": "factorised"},
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
                fmt(row["heldout_shuffled_nll"]),
                fmt(row["heldout_random_string_nll"]),
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
        "shuffled",
        "random string",
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "cache")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "cache" / "design_sweep", help="the run's own report")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    pipeline.GENERATOR_VARIANTS = dict(DESIGNS)
    results = bigbench_zero_shot.main(
        ["--preset", args.preset, "--cache-dir", str(args.cache_dir), "--output-dir", str(args.work_dir)]
    )
    sweep = {
        "preset": args.preset,
        "bank_tasks": len(results["split"]["train"]),
        "heldout_tasks": len(results["heldout"]),
        "seen_tasks": len(results["seen"]),
        "rows": sweep_rows(results),
        "controls": controls(results),
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(sweep, args.output_dir / f"design_sweep_{args.preset}.json")
    text = markdown(sweep)
    (args.output_dir / f"design_sweep_{args.preset}.md").write_text(text, encoding="utf-8")
    print(text)
    return sweep


if __name__ == "__main__":
    main()
