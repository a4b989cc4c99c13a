"""The README's result tables, generated from the committed benchmark results (`benchmarks/results/*.json`).

README.md holds a `<!-- results-summary -->` ... `<!-- /results-summary -->` block that `python docs/hooks.py`
fills from the JSON files below, so the seen-task and unseen-task numbers users read are the committed results of a
named command, never typed by hand; `tests/test_docs_reference.py` fails when the block is stale.

- Six text domains (`lora_generation.py`, the design with task memory and a converged tail of 40 checkpoints): each
  seen domain's generated perplexity relative to its own LoRA, next to the model soup and PEFT's TIES merge; each
  held-out domain's share of the LoRA's perplexity gain recovered.
- BIG-bench held-out task families (`bigbench_zero_shot.py`, the `full` preset when its results are committed, else
  `quick`): every control's mean answer NLL over held-out tasks with its bootstrap 95% interval, the share of the
  oracle's gain recovered, and how often the description beats a shuffled description and a random string.
"""

import json
import re
from pathlib import Path

from benchmarks.bigbench.report import is_steering_control
from benchmarks.reporting import markdown_table

__all__ = ["readme_summary"]

RESULTS = Path(__file__).resolve().parent / "results"
SIX_DOMAINS = "lora_generation_full-cpu-converged.json"
BIGBENCH_PRESETS = ("full", "quick")  # the first one with committed results is summarised


def _command(results: dict) -> str:
    """The command that made `results`, without where its report was written (a scratch path of that run)."""
    return re.sub(r" --report \S+", "", results["command"])


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:.3f} x"


def six_domain_summary(results: dict) -> str:
    seen, unseen = results["seen"], results["unseen"]
    seen_rows = []
    for domain, scores in seen.items():
        original = scores["original LoRA"]["perplexity"]
        seen_rows.append(
            [
                domain,
                f"{original:.2f}",
                _ratio(scores["generated (description, mean)"]["perplexity"], original),
                _ratio(scores["own checkpoint mean"]["perplexity"], original),
                _ratio(scores["model soup"]["perplexity"], original),
                _ratio(scores["TIES merge"]["perplexity"], original),
            ]
        )
    unseen_rows = []
    for domain, scores in unseen.items():
        nearest = next(name for name in scores if name.startswith("best other-domain LoRA"))
        soup = next(name for name in scores if name.startswith("model soup"))
        unseen_rows.append(
            [
                domain,
                f"{scores['generated from description']['recovered']:.0%}",
                f"{scores['generated from examples']['recovered']:.0%}",
                f"{scores[soup]['recovered']:.0%}",
                f"{scores[nearest]['recovered']:.0%} ({nearest.split('(')[-1].rstrip(')')})",
            ]
        )
    return "\n\n".join(
        [
            f"**Six text domains, seen by the generator** (`{_command(results)}`; held-out perplexity, ratio to "
            "the domain's own LoRA, lower is better):",
            markdown_table(
                ["domain", "own LoRA", "generated", "own checkpoint mean", "model soup", "TIES merge"], seen_rows
            ),
            "**Held-out domains** (the generator never saw them; share of the base -> own-LoRA perplexity gain "
            "recovered, higher is better):",
            markdown_table(
                ["domain", "generated (description)", "generated (examples)", "soup of the others", "best other LoRA"],
                unseen_rows,
            ),
        ]
    )


def bigbench_summary(results: dict, preset: str) -> str:
    summary, split = results["summary"], results["split"]
    controls = summary["controls"]
    rows = []
    for name, entry in sorted(controls.items(), key=lambda item: item[1]["answer_nll"][0]):
        if is_steering_control(name):
            continue
        nll, low, high = entry["answer_nll"]
        accuracy = entry.get("accuracy")
        rows.append(
            [
                name,
                f"{nll:.3f} [{low:.3f}, {high:.3f}]",
                f"{entry['recovered_of_average']:.0%}",
                "-" if not accuracy else f"{accuracy[0]:.3f}",
            ]
        )
    steering = []
    for name in controls:
        if name.startswith("generated") and not is_steering_control(name):
            wins = summary["wins"].get(name, {})
            shuffled, random_string = wins.get(f"{name}, shuffled"), wins.get(f"{name}, random string")
            if shuffled is not None and random_string is not None:
                steering.append(
                    f"{name}: beats another held-out task's condition on {shuffled}/{summary['heldout_tasks']} tasks "
                    f"and a random string on {random_string}/{summary['heldout_tasks']}"
                )
    header = (
        f"**BIG-bench, held-out task families** (`python benchmarks/bigbench_zero_shot.py --preset {preset}`: "
        f"{split['train_tasks']} bank tasks from {len(split['train_families'])} families, "
        f"{summary['heldout_tasks']} held-out tasks from {len(split['heldout_families'])} other families; answer "
        "NLL per token with its bootstrap 95% interval, lower is better; share of the oracle's gain recovered; "
        "multiple-choice accuracy):"
    )
    parts = [header, markdown_table(["control", "answer NLL", "gain recovered", "accuracy"], rows)]
    if steering:
        parts.append("Does the condition steer? " + "; ".join(steering) + ".")
    return "\n\n".join(parts)


def readme_summary(results_folder: Path = RESULTS) -> str:
    """The markdown of the README's results block, from the committed JSON files in `results_folder`."""
    parts = [six_domain_summary(json.loads((results_folder / SIX_DOMAINS).read_text(encoding="utf-8")))]
    for preset in BIGBENCH_PRESETS:
        path = results_folder / f"bigbench_zero_shot_{preset}.json"
        if path.exists():
            parts.append(bigbench_summary(json.loads(path.read_text(encoding="utf-8")), preset))
            break
    return "\n\n".join(parts)
