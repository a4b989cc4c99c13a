"""Statistics, plots and the markdown report of the BIG-bench zero-shot benchmark (all from the results JSON).

- Averages over held-out tasks with bootstrap 95% intervals. Tasks of one family are correlated (two `arithmetic`
  variants), so the bootstrap resamples FAMILIES (a cluster bootstrap), and with them all their tasks.
- The share of the oracle's gain recovered: `(base - x) / (base - oracle)` in answer NLL, as the ratio of the
  averages (stable when one task's oracle gains little) and as the median over tasks.
- The difference of each generator to the best control (the control among multi-task, mean, and nearest / top-k
  retrieval by description or by examples with the lowest average NLL), with its interval: an interval below 0 means
  the generator wins.
- Win counts: on how many held-out tasks a generated LoRA has a lower answer NLL than each control.
"""

import math
import random
from pathlib import Path

__all__ = ["console_table", "markdown", "plots", "summarize"]

# With the shared-start bank: a multi-task LoRA given the steps of the multi-task LoRA and that bank together, so that
# the shared-start designs meet a control of their own training budget.
MATCHED_MULTITASK = "multi-task LoRA, shared-start budget"
# A multi-task LoRA given, on top of its own steps, the base-model passes the functional-offset generator trained with
FUNCTIONAL_MULTITASK = "multi-task LoRA, functional-offset budget"
BASELINES = ("multi-task LoRA", MATCHED_MULTITASK, FUNCTIONAL_MULTITASK, "mean of bank LoRAs", "nearest description")
BASELINES += ("top-k mix", "nearest by examples", "top-k mix by examples")
# Designs, not controls: the shared-start bank's LoRAs cost another (bank tasks x steps) on top of the multi-task LoRA.
SHARED_START = ("shared start: mean", "shared start: nearest description", "shared start: top-k mix")
FIRST = ("base", "oracle", "own LoRA (final)", "own checkpoint mean", *BASELINES, *SHARED_START)
DESIGNS = ("generated", "shared start")  # rows measured against the best control, not candidates for it
VARIANT_ORDER = (
    "plain",
    "task memory",
    "task memory + holdout 0.5",
    "task memory, centred",
    "task memory + holdout 0.5 + functional",
    "task memory + holdout 0.5 + functional offset",
    "shared start + task memory",
)


STEERING_SUFFIXES = (", shuffled", ", random string")  # a design's rows from another task's condition / a random one


def is_steering_control(row: str) -> bool:
    """A design's row from another held-out task's condition or from a random string (a variant name may hold ", ")."""
    return row.endswith(STEERING_SUFFIXES)


def ordered(names) -> list[str]:
    """Controls in a fixed order (the JSON stores keys sorted): base, oracle, the simple controls, then the generated
    ones by variant, condition kind, own / shuffled / random string."""

    def rank(name: str):
        if name in FIRST:
            return (0, FIRST.index(name), "")
        variant = next((i for i, v in enumerate(VARIANT_ORDER) if f"({v})" in name), 9)
        source = 1 if name.endswith(", shuffled") else 2 if name.endswith(", random string") else 0
        return (1, variant, ("examples" in name, source, name))

    return sorted(names, key=rank)


def _families(results) -> dict[str, str]:
    return {name: info["family"] for name, info in results["tasks"].items()}


def _bootstrap(values_by_task: dict[str, float], families: dict[str, str], samples: int, seed: int = 0):
    """(mean, low, high): the mean over tasks and a 95% interval from resampling families with replacement."""
    values = {name: value for name, value in values_by_task.items() if value is not None and math.isfinite(value)}
    if not values:
        return None, None, None
    groups: dict[str, list[float]] = {}
    for name, value in sorted(values.items()):
        groups.setdefault(families[name], []).append(value)
    clusters = list(groups.values())
    mean = sum(values.values()) / len(values)
    rng = random.Random(seed)
    means = []
    for _ in range(samples):
        drawn = [value for _ in clusters for value in rng.choice(clusters)]
        means.append(sum(drawn) / len(drawn))
    means.sort()
    return mean, means[int(0.025 * (samples - 1))], means[int(0.975 * (samples - 1))]


def summarize(results: dict) -> dict:
    """Per-control averages, intervals, recovered shares, differences to the best control and win counts."""
    heldout = results["heldout"]
    families = _families(results)
    samples = results["settings"]["bootstrap_samples"]
    controls = ordered(next(iter(heldout.values())))
    summary = {"controls": {}, "differences": {}, "wins": {}}
    for control in controls:
        nll = {task: scores[control]["answer_nll"] for task, scores in heldout.items()}
        accuracy = {task: scores[control]["accuracy"] for task, scores in heldout.items()}
        base = {task: scores["base"]["answer_nll"] for task, scores in heldout.items()}
        oracle = {task: scores["oracle"]["answer_nll"] for task, scores in heldout.items()}
        shares = sorted((base[t] - nll[t]) / (base[t] - oracle[t]) for t in heldout if base[t] - oracle[t] > 1e-6)
        mean_base, mean_oracle, mean_x = (sum(v.values()) / len(v) for v in (base, oracle, nll))
        row = {
            "answer_nll": _bootstrap(nll, families, samples),
            "accuracy": _bootstrap(accuracy, families, samples),
            "recovered_of_average": (mean_base - mean_x) / (mean_base - mean_oracle)
            if mean_base != mean_oracle
            else None,
            "recovered_median": shares[len(shares) // 2] if shares else None,
            "multiple_choice_tasks": sum(a is not None for a in accuracy.values()),
        }
        summary["controls"][control] = row
    baseline_means = {c: summary["controls"][c]["answer_nll"][0] for c in BASELINES if c in summary["controls"]}
    best = min(baseline_means, key=baseline_means.get)
    summary["best_control"] = best
    for control in controls:
        if not control.startswith(DESIGNS):
            continue
        difference = {t: s[control]["answer_nll"] - s[best]["answer_nll"] for t, s in heldout.items()}
        summary["differences"][control] = _bootstrap(difference, families, samples)
        against = [c for c in controls if not c.startswith(DESIGNS)]
        against += [c for c in (f"{control}, shuffled", f"{control}, random string") if c in controls]
        summary["wins"][control] = _wins(heldout.values(), control, against)
    summary["heldout_tasks"] = len(heldout)
    summary["targets"] = _targets(summary, heldout, families, samples)
    return summary


# Issue 13's targets for a generated design, on the held-out tasks of one split
RECOVERED_TARGET = 0.6  # of the oracle's NLL gain, on average
STEER_TARGET = 0.9  # share of held-out tasks where the own condition beats the shuffled one and the random string


def _targets(summary: dict, heldout: dict, families: dict, samples: int) -> dict:
    """Per generated design (own condition): is each of issue 13's targets met? `beats_every_control`: the average
    NLL below every control's and the interval of the difference to the best one below 0; `recovers`: >= 60% of the
    oracle's gain on average; `steers`: the own condition beats the shuffled one and the random string on >= 90% of
    tasks; `accuracy`: average multiple-choice accuracy minus the most accurate control's (interval), met when >= 0."""
    controls = [c for c in BASELINES if c in summary["controls"]]
    accuracies = {c: summary["controls"][c]["accuracy"][0] for c in controls}
    accuracies = {c: a for c, a in accuracies.items() if a is not None}
    most_accurate = max(accuracies, key=accuracies.get) if accuracies else None
    tasks = len(heldout)
    targets = {}
    for design, difference in summary["differences"].items():
        if not design.startswith("generated") or is_steering_control(design):
            continue
        mean = summary["controls"][design]["answer_nll"][0]
        wins = summary["wins"][design]
        steer = [wins.get(f"{design}, {source}") for source in ("shuffled", "random string")]
        row = {
            "beats_every_control": all(mean < summary["controls"][c]["answer_nll"][0] for c in controls)
            and difference[2] < 0,
            "recovered": summary["controls"][design]["recovered_of_average"],
            "steer_shares": [None if count is None else count / tasks for count in steer],
        }
        row["recovers"] = row["recovered"] is not None and row["recovered"] >= RECOVERED_TARGET
        row["steers"] = all(share is not None and share >= STEER_TARGET for share in row["steer_shares"])
        if most_accurate is not None:
            gap = {
                t: s[design]["accuracy"] - s[most_accurate]["accuracy"]
                for t, s in heldout.items()
                if s[design]["accuracy"] is not None
            }
            row["accuracy_control"] = most_accurate
            row["accuracy_difference"] = _bootstrap(gap, families, samples)
            row["accuracy_no_worse"] = row["accuracy_difference"][0] is not None and row["accuracy_difference"][0] >= 0
        targets[design] = row
    return targets


def _wins(tasks, row: str, against: list[str]) -> dict[str, int]:
    """For each row of `against`: on how many tasks (each `{row: score}`) `row` has the lower answer NLL."""
    tasks = list(tasks)
    return {other: sum(s[row]["answer_nll"] < s[other]["answer_nll"] for s in tasks) for other in against}


def pool_splits(runs: dict[int, dict]) -> dict | None:
    """The held-out tasks of several family splits (`{split seed: results}`, each with its `summarize` summary)
    pooled: per row present in every split,
    its mean per split and over all tasks with a 95% family-bootstrap interval; the best control over the pool; each
    design's difference to it (interval) and the tasks it wins. None for fewer than two splits. A task held out in two
    splits counts twice (each split's LoRAs differ); families are the bootstrap clusters."""
    if len(runs) < 2:
        return None
    rows = set.intersection(*(set(next(iter(r["heldout"].values()))) for r in runs.values()))
    scores, families = {}, {}
    for seed, results in sorted(runs.items()):
        for task, by_row in results["heldout"].items():
            scores[seed, task] = by_row
            families[seed, task] = results["tasks"][task]["family"]
    samples = max(r["settings"]["bootstrap_samples"] for r in runs.values())
    pooled = {"splits": sorted(runs), "tasks": len(scores), "rows": {}, "differences": {}, "wins": {}}
    for row in ordered(rows):
        per_split = {
            seed: sum(s[row]["answer_nll"] for s in r["heldout"].values()) / len(r["heldout"])
            for seed, r in sorted(runs.items())
        }
        overall = _bootstrap({key: s[row]["answer_nll"] for key, s in scores.items()}, families, samples)
        pooled["rows"][row] = {"per_split": per_split, "answer_nll": overall}
    controls = [row for row in BASELINES if row in rows]
    best = min(controls, key=lambda row: pooled["rows"][row]["answer_nll"][0])
    pooled["best_control"] = best
    for row in pooled["rows"]:
        if row.startswith(DESIGNS) and not is_steering_control(row):
            difference = {key: s[row]["answer_nll"] - s[best]["answer_nll"] for key, s in scores.items()}
            pooled["differences"][row] = _bootstrap(difference, families, samples)
            against = [other for other in (*controls, f"{row}, shuffled", f"{row}, random string") if other in rows]
            pooled["wins"][row] = _wins(scores.values(), row, against)
    # each split's verdict on issue 13's targets ("another split seed gives the same verdict")
    per_split_targets = {seed: results["summary"]["targets"] for seed, results in sorted(runs.items())}
    pooled["targets_met"] = {
        design: {seed: _met(targets[design]) for seed, targets in per_split_targets.items()}
        for design in ordered(set.intersection(*(set(t) for t in per_split_targets.values())))
    }
    return pooled


def _met(target: dict) -> list[str]:
    """The names of the issue 13 targets a design's `_targets` row meets."""
    checks = {"beats every control": target["beats_every_control"], "recovers": target["recovers"]}
    checks["steers"] = target["steers"]
    if "accuracy_no_worse" in target:
        checks["MC accuracy"] = target["accuracy_no_worse"]
    return [name for name, met in checks.items() if met]


def pooled_markdown(pooled: dict) -> list[str]:
    """The report's section on all family splits together."""
    seeds = pooled["splits"]
    lines = [
        "## All family splits together",
        "",
        f"Split seeds {', '.join(map(str, seeds))}, {pooled['tasks']} held-out tasks in all; each split's JSON is its "
        "own run (`--split-seed`); rows present in every split. Mean answer NLL per split, and over all held-out "
        "tasks with a 95% family-bootstrap interval:",
        "",
        "| row | " + " | ".join(f"split {seed}" for seed in seeds) + " | all tasks |",
        "|---|" + "---|" * (len(seeds) + 1),
    ]
    for row, entry in pooled["rows"].items():
        cells = [f"{entry['per_split'][seed]:.3f}" for seed in seeds]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {_interval(entry['answer_nll'])} |")
    best = pooled["best_control"]
    lines += [
        "",
        f"Designs minus the best control over all splits, **{best}** (an interval below 0 = the design wins), and "
        "the held-out tasks each design wins against every control and its own shuffled / random-string conditions:",
        "",
        "| design | difference [95% CI] | tasks won (of " + str(pooled["tasks"]) + ") |",
        "|---|---|---|",
    ]
    for row, difference in pooled["differences"].items():
        wins = "; ".join(f"{other.removeprefix(row + ', ')}: {n}" for other, n in pooled["wins"][row].items())
        lines.append(f"| {row} | {_interval(difference)} | {wins} |")
    if pooled.get("targets_met"):
        lines += [
            "",
            "Issue 13's targets met in each split (beats every control, recovers, steers, MC accuracy; defined in the "
            "split's own report):",
            "",
            "| generated | " + " | ".join(f"split {seed}" for seed in seeds) + " |",
            "|---|" + "---|" * len(seeds),
        ]
        for design, by_seed in pooled["targets_met"].items():
            cells = [", ".join(by_seed[seed]) or "none" for seed in seeds]
            lines.append(f"| {design} | " + " | ".join(cells) + " |")
    return lines + [""]


def _interval(triple, digits: int = 3) -> str:
    mean, low, high = triple
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _share(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def console_table(results: dict) -> str:
    summary = results["summary"]
    lines = [f"{'control':58s} {'answer NLL [95% CI]':28s} {'accuracy':24s} recovered"]
    for control in ordered(summary["controls"]):
        row = summary["controls"][control]
        lines.append(
            f"{control:58s} {_interval(row['answer_nll']):28s} {_interval(row['accuracy']):24s} "
            f"{_share(row['recovered_of_average'])}"
        )
    return "\n".join(lines)


def plots(results: dict, output_dir: Path, prefix: str) -> list[Path]:
    """Per-task recovered share, generated vs retrieval scatter, t-SNE of description vectors by family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    output_dir.mkdir(parents=True, exist_ok=True)
    heldout = results["heldout"]
    tasks = sorted(heldout)
    paths = []
    shown = ["nearest description", "top-k mix", "multi-task LoRA", "mean of bank LoRAs", "shared start: mean"]
    shown = [c for c in shown if c in heldout[tasks[0]]]
    shown += [
        c for c in ordered(next(iter(heldout.values()))) if c.startswith("generated") and not is_steering_control(c)
    ]

    def recovered(task, control):
        base, oracle = heldout[task]["base"]["answer_nll"], heldout[task]["oracle"]["answer_nll"]
        gain = base - oracle
        return (base - heldout[task][control]["answer_nll"]) / gain if gain > 1e-6 else float("nan")

    figure, axis = plt.subplots(figsize=(max(6, 0.5 * len(tasks) + 3), 4.5))
    width = 0.8 / len(shown)
    for index, control in enumerate(shown):
        values = [max(-1.0, min(1.5, recovered(task, control))) for task in tasks]
        axis.bar(np.arange(len(tasks)) + index * width, values, width, label=control)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.axhline(1, color="gray", linewidth=0.8, linestyle="--")
    axis.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=60, ha="right", fontsize=7)
    axis.set_ylabel("share of oracle's NLL gain recovered")
    axis.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    paths.append(output_dir / f"{prefix}_recovered.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(5.5, 5))
    for control, marker in (
        ("generated (task memory) from description", "o"),
        ("generated (plain) from description", "x"),
        ("generated (task memory + holdout 0.5 + functional) from description", "^"),
        ("generated (task memory + holdout 0.5 + functional offset) from description", "s"),
    ):
        if control in heldout[tasks[0]]:
            x = [heldout[t]["nearest description"]["answer_nll"] for t in tasks]
            y = [heldout[t][control]["answer_nll"] for t in tasks]
            axis.scatter(x, y, marker=marker, label=control)
    limit = max(max(s["nearest description"]["answer_nll"], s["base"]["answer_nll"]) for s in heldout.values())
    axis.plot([0, limit], [0, limit], color="gray", linewidth=0.8)
    axis.set_xlabel("nearest-description LoRA: answer NLL")
    axis.set_ylabel("generated LoRA: answer NLL")
    axis.legend(fontsize=7)
    figure.tight_layout()
    paths.append(output_dir / f"{prefix}_generated_vs_retrieval.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    vectors = results["task_vectors"]["description"]
    names = list(vectors)
    if len(names) >= 4:
        from sklearn.manifold import TSNE

        points = TSNE(
            n_components=2, perplexity=min(30.0, (len(names) - 1) / 3), random_state=0, init="random"
        ).fit_transform(np.array([vectors[name] for name in names]))
        families = results["task_vectors"]["families"]
        family_names = sorted(set(families.values()))
        colours = plt.get_cmap("tab20")
        figure, axis = plt.subplots(figsize=(7, 6))
        for index, name in enumerate(names):
            role = results["tasks"][name]["role"]
            colour = colours(family_names.index(families[name]) % 20)
            axis.scatter(
                *points[index],
                color=colour,
                marker="*" if role == "heldout" else "o",
                s=60 if role == "heldout" else 20,
            )
        axis.set_title("t-SNE of description vectors (MiniLM), colour = family, star = held out", fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
        figure.tight_layout()
        paths.append(output_dir / f"{prefix}_task_vectors.png")
        figure.savefig(paths[-1], dpi=110)
        plt.close(figure)
    return paths


def markdown(results: dict, images: list[str], prefix: str, pooled: dict | None = None) -> str:
    summary = results["summary"]
    settings = results["settings"]
    data = results["data"]
    split = results["split"]
    timings = results["timings"]
    preset = prefix.removeprefix("bigbench_zero_shot_")
    lines = [
        f"# Benchmark: zero-shot LoRAs for unseen BIG-bench tasks (`{preset}` preset)",
        "",
        "Generated by `python benchmarks/bigbench_zero_shot.py --preset "
        f"{preset.split('_split')[0]}`; numbers from `benchmarks/results/{prefix}.json`. Protocol: issue 12, "
        "[how it works](#how-it-works) below.",
        "",
    ]
    if preset.startswith("full"):
        lines += [
            "Issue 13's designs this preset leaves out on a CPU (the shared-start bank, the functional loss without "
            "the offset) are measured on the `quick` preset over several family splits: [its "
            "report](benchmarks_bigbench_quick.md) (`--preset quick`, then `--split-seed 1` and `2`).",
            "",
        ]
    lines += [
        "## Data and split",
        "",
        f"- Source: {data['sdist'].get('requirement')} (sdist sha256 `{data['sdist'].get('sha256', '-')}`).",
        f"- Rules (`benchmarks/bigbench/selection.py`): {data['task_files']} task files -> {data['candidate_tasks']} "
        f"candidate tasks in {data['candidate_families']} families (JSON, English, enough raw examples; skipped: "
        + ", ".join(
            f"{count} {reason}" for reason, count in data["skipped"].items() if reason != "too few usable examples"
        )
        + f"). The split walk checked the token rule on {data['checked_tasks']} of them, {data['usable_of_checked']} "
        f"passed; used: {data['multiple_choice_used']} multiple choice, {data['generative_used']} generative.",
        f"- Split seed {settings['split_seed']}: bank = {split['train_tasks']} tasks from "
        f"{len(split['train_families'])} families; held out = {split['heldout_tasks']} tasks from "
        f"{len(split['heldout_families'])} families ({', '.join(split['heldout_families'])}).",
        f"- LoRA per task: r={settings['lora_r']} on q_proj, v_proj, {settings['steps']} steps of batch "
        f"{settings['batch_size']}, lr {settings['lr']} cosine, checkpoints every {settings['save_steps']} steps of "
        f"the last {settings['last_fraction']:.2f} of training ({results['loras']['checkpoints_per_task']} per task); "
        f"multi-task LoRA: {results['loras']['multitask']['steps']} steps "
        f"({settings['multitask_step_fraction']:g} x bank tasks x steps).",
        f"- Scored on up to {settings['scored_test_examples']} test examples per task; prompt + answer <= "
        f"{settings['rules']['max_tokens']} tokens.",
        "",
        f"## Held-out tasks ({summary['heldout_tasks']} tasks, averages with 95% family-bootstrap intervals)",
        "",
        "| control | answer NLL (lower is better) | MC accuracy | recovered (of average) | recovered (median task) |",
        "|---|---|---|---|---|",
    ]
    for control in ordered(summary["controls"]):
        row = summary["controls"][control]
        lines.append(
            f"| {control} | {_interval(row['answer_nll'])} | {_interval(row['accuracy'])} | "
            f"{_share(row['recovered_of_average'])} | {_share(row['recovered_median'])} |"
        )
    best = summary["best_control"]
    baselines = [control for control in BASELINES if control in summary["controls"]]
    lines += [
        "",
        f"Best simple control (lowest average NLL among {', '.join(baselines)}): **{best}**.",
        "",
        f"### Generated minus {best} (answer NLL; an interval below 0 = the generator wins)",
        "",
        "| generated | difference [95% CI] | tasks won against: " + " / ".join(baselines) + " / base / oracle |",
        "|---|---|---|",
    ]
    for control in ordered(summary["differences"]):
        difference = summary["differences"][control]
        if is_steering_control(control):
            continue
        wins = summary["wins"][control]
        counts = " / ".join(str(wins.get(c, "-")) for c in (*baselines, "base", "oracle"))
        lines.append(f"| {control} | {_interval(difference)} | {counts} (of {summary['heldout_tasks']}) |")
    lines += _targets_markdown(summary)
    lines += [
        "",
        "### Does the condition steer? Own condition vs another held-out task's (shuffled) vs a random string",
        "",
        "| generated | own: avg NLL | shuffled: avg NLL | random string: avg NLL | own beats shuffled "
        "| own beats random |",
        "|---|---|---|---|---|---|",
    ]
    for control in ordered(summary["controls"]):
        row = summary["controls"][control]
        if not control.startswith("generated") or is_steering_control(control):
            continue
        shuffled, random_string = f"{control}, shuffled", f"{control}, random string"
        if shuffled not in summary["controls"]:
            continue
        wins = summary["wins"][control]
        lines.append(
            f"| {control} | {row['answer_nll'][0]:.3f} | {summary['controls'][shuffled]['answer_nll'][0]:.3f} | "
            f"{summary['controls'][random_string]['answer_nll'][0]:.3f} | {wins.get(shuffled, '-')} / "
            f"{summary['heldout_tasks']} | {wins.get(random_string, '-')} / {summary['heldout_tasks']} |"
        )
    lines += ["", "### Per held-out task: answer NLL (accuracy)", ""]
    heldout = results["heldout"]
    present = next(iter(heldout.values()))
    columns = [c for c in ("base", "oracle", *BASELINES, *SHARED_START) if c in present] + [
        c for c in ordered(present) if c.startswith("generated") and not is_steering_control(c)
    ]
    lines += ["| task | family | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for task, scores in sorted(heldout.items()):
        cells = []
        for column in columns:
            score = scores[column]
            accuracy = "" if score["accuracy"] is None else f" ({score['accuracy']:.2f})"
            cells.append(f"{score['answer_nll']:.2f}{accuracy}")
        lines.append(f"| {task} | {results['tasks'][task]['family']} | " + " | ".join(cells) + " |")
    lines += ["", "Retrieval picks (nearest bank task by description; by examples, where run):", ""]
    for task, picked in sorted(results["retrieval"].items()):
        by_examples = f"; by examples -> {picked['nearest_by_examples']}" if "nearest_by_examples" in picked else ""
        lines.append(f"- {task} -> {picked['nearest']}{by_examples}")
    if pooled is not None:
        lines += [""] + pooled_markdown(pooled)
    seen = results["seen"]
    if seen:
        seen_columns = ordered(next(iter(seen.values())))
        lines += [
            "",
            "## Seen tasks (bank tasks' own test examples: memorisation stays visible)",
            "",
            "| task | " + " | ".join(seen_columns) + " |",
            "|---|" + "---|" * len(seen_columns),
        ]
        for task, scores in sorted(seen.items()):
            lines.append(f"| {task} | " + " | ".join(f"{scores[c]['answer_nll']:.2f}" for c in seen_columns) + " |")
    lines += [
        "",
        "## Generators (today's `PeftCVAEGenerator`)",
        "",
        "| generator | parameters | train s | first loss | final loss |",
        "|---|---|---|---|---|",
    ]
    for name, entry in sorted(results["generators"].items()):
        lines.append(
            f"| {name} | {entry['parameters']:,} | {entry['train_seconds']:.0f} | {entry['first_loss']:.4f} | "
            f"{entry['final_loss']:.4f} |"
        )
    lora_seconds = sorted(results["loras"]["per_task_train_seconds"].values())
    score_seconds = [
        s.get("seconds", 0.0) for part in ("heldout", "seen") for t in results[part].values() for s in t.values()
    ]
    generator_seconds = sum(entry["train_seconds"] for entry in results["generators"].values())
    lines += [
        "",
        "## Cost",
        "",
        "Compute time of each step as recorded when it ran (cached steps keep their original time):",
        "",
        f"- LoRAs: {len(lora_seconds)} task LoRAs, {sum(lora_seconds) / 60:.1f} min in all (median "
        f"{lora_seconds[len(lora_seconds) // 2]:.0f} s per task); multi-task LoRA "
        f"{results['loras']['multitask']['train_seconds'] / 60:.1f} min"
        + (
            f" (steps {results['loras']['multitask']['resumed_from']}-{results['loras']['multitask']['steps']} only: "
            "it resumed from an interrupted run)."
            if results["loras"]["multitask"].get("resumed_from")
            else "."
        ),
        f"- Generators: {len(results['generators'])} trained in {generator_seconds / 60:.1f} min.",
        f"- Scoring: {len(score_seconds)} (task, control) scores in {sum(score_seconds) / 60:.1f} min.",
        f"- This invocation: {timings['total'] / 60:.1f} min wall ({timings['scores_computed']} scores computed; "
        f"data and selection {timings['data_and_selection']:.0f} s).",
        f"- Environment: Python {results['environment']['python']}, torch {results['environment']['torch']}, "
        f"{results['environment']['cpu_threads']} threads.",
    ]
    if images:
        lines += ["", "## Plots", ""] + [f"![{Path(link).stem}]({link})" for link in images]
    lines += ["", HOW_IT_WORKS]
    return "\n".join(lines) + "\n"


def _targets_markdown(summary: dict) -> list[str]:
    """Issue 13's targets, met or not, per generated design (`summarize`'s `targets`)."""
    targets = summary.get("targets")
    if not targets:
        return []
    lines = [
        "",
        "### Issue 13's targets, per generated design",
        "",
        f"Beats every control (average NLL below each, interval of the difference to {summary['best_control']} "
        f"below 0); recovers >= {RECOVERED_TARGET:.0%} of the oracle's gain on average; the own condition beats the "
        f"shuffled one and the random string on >= {STEER_TARGET:.0%} of held-out tasks; multiple-choice accuracy no "
        "worse on average than the most accurate control (difference with its interval).",
        "",
        "| generated | beats every control | recovered | beats shuffled / random | MC accuracy difference | met |",
        "|---|---|---|---|---|---|",
    ]
    for design in ordered(targets):
        row = targets[design]
        shares = " / ".join("-" if share is None else f"{share:.0%}" for share in row["steer_shares"])
        accuracy, checked = "-", 3
        if "accuracy_difference" in row:
            met = "yes" if row["accuracy_no_worse"] else "no"
            accuracy, checked = f"{_interval(row['accuracy_difference'])} vs {row['accuracy_control']} ({met})", 4
        lines.append(
            f"| {design} | {'yes' if row['beats_every_control'] else 'no'} | {_share(row['recovered'])} "
            f"({'yes' if row['recovers'] else 'no'}) | {shares} ({'yes' if row['steers'] else 'no'}) | {accuracy} "
            f"| {len(_met(row))} of {checked} |"
        )
    return lines


HOW_IT_WORKS = """## How it works

- **Data**: the PyPI sdist `bigbench==1.0.0` is downloaded with `pip download --no-deps` (never installed), its sha256
  checked, and only its `task.json` files are extracted. Tasks are selected by the rules in
  `benchmarks/bigbench/selection.py`: JSON tasks in English (keywords, name and script), >= 100 usable examples whose
  prompt + answer fit the token limit. Prompts are BIG-bench's zero-shot format: `task_prefix +
  example_input_prefix + input (+ choices) + example_output_prefix`; the answer is the target (for multiple choice,
  the best-scoring choice).
- **Split by family** (the top-level folder under `benchmark_tasks`), drawn from `--split-seed`: a held-out family
  gives no example and no checkpoint to the bank, the multi-task LoRA, the generators or any tuning. Each family
  contributes at most a few tasks, so families with dozens of variants do not dominate.
- **LoRAs** through `peft_cvae.collect.train_task_lora` (the path `peft-cvae collect` runs): the same LoRA
  initialisation for every task, answer-only loss, cosine decay; the checkpoints of the last part of training go
  into the bank. The oracle is the held-out task's own final LoRA; bank-side controls use each bank task's
  checkpoint mean (what the bank stores about a task).
- **Controls**: base model; oracle (ceiling); multi-task LoRA (one LoRA on all bank tasks' examples); the mean of the
  bank LoRAs; nearest-description retrieval (cosine of MiniLM description vectors); the top-k mix (softmax of
  cosine / temperature over the k nearest, fixed k and temperature); the same two rules on the in-context vectors
  (`nearest by examples`, `top-k mix by examples`: the retrieval a generator from examples must beat); the
  generators from the task's description, from 8 of its training examples (Eq. 1: SmolLM2's last hidden state at
  the last token, averaged), from another held-out task's description or examples (shuffled) and from a random
  string; where the preset asks (`combined_condition_variants`), the task-memory generator on the description and
  the examples together (`from description + examples`: each part centred on the bank tasks' mean and normalised,
  then concatenated).
- **Designs beyond today's generator** (issue 13), where the preset has them: the leave-one-task-out generator
  trained on with the functional loss (`... + functional`: the decoded LoRA's answer NLL on its task's training
  examples joins the loss); the same with a functional offset (`... + functional offset`: a LoRA-sized vector added
  to every generated LoRA, trained by the functional loss only, at the bank LoRAs' learning rate, with the loss on
  what generation writes for the condition at z = 0 and the own task hidden from the memory half the time);
  the shared-start bank (`shared start: ...`: every bank task's LoRA trained again from the
  multi-task LoRA, `collect --start-adapter`), with its mean, retrieval, top-k mix and a task-memory generator, and
  its control `multi-task LoRA, shared-start budget`: a multi-task LoRA given the steps of the multi-task LoRA and
  the shared-start bank together.
- **Metrics**: answer NLL per token (nats; scored exactly as trained: prompt and answer tokenized separately) and
  multiple-choice accuracy (the choice with the highest summed log-likelihood), by
  `peft_cvae.answer_evaluation.evaluate_answers` (each prompt run once, its choices scored from its key/value
  cache; the time saved: `benchmarks/results/answer_scoring_full.md`). Intervals: 95% bootstrap over families.
- **Cache**: every LoRA, condition, generator and score is cached under `--cache-dir` and reused on a rerun;
  `--report-only` recomputes the JSON's summary and rewrites this page from the JSON.
"""
