"""The markdown report of a run (targets, tables, plots, settings) and the table comparing the designs tried, read
from the saved results of each; both regenerate byte for byte from the JSON (`--report-only`)."""

import json
from dataclasses import asdict
from pathlib import Path

import torch

from peft_cvae.file_utils import read_json

from .settings import CONDITION_KINDS, DEFAULT_BASE_MODEL, DESIGN_HISTORY, REPORT_PAGES, Settings
from .targets import SEEN_PPL_RATIO_TARGET, ratios_to_original

BASE_MODEL_NAMES = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma-3-270M"}
FAMILY_NAMES = {"smollm2-135m": "SmolLM2", "gemma3-270m": "Gemma-3"}  # as the report's prose names them


def base_model_name(settings: Settings) -> str:
    """The base model as a reader knows it (`tiny Llama` on the tiny preset)."""
    return "tiny Llama" if settings.tiny else BASE_MODEL_NAMES.get(settings.base_model, settings.base_model)


def task_vector_table(points: dict) -> list[str]:
    """Markdown lines: for each kind of condition, the cosine between the domains' task vectors (the mean of each
    domain's points) and, on the diagonal, the mean cosine of one domain's single-example vectors to their mean:
    how far apart the encoder puts the domains, against how much one example moves it."""
    lines = []
    for kind, per_domain in points.items():
        names = list(per_domain)
        vectors = {name: torch.tensor(per_domain[name], dtype=torch.float32) for name in names}  # (n, H) each
        means = {name: v.mean(dim=0) for name, v in vectors.items()}
        size = next(iter(means.values())).numel()
        lines += [
            "",
            f"`{kind}` ({size} numbers per task, {len(next(iter(vectors.values())))} point(s) per domain):",
            "",
            "| | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        for a in names:
            cells = []
            for b in names:
                if a == b:
                    own = torch.nn.functional.cosine_similarity(vectors[a], means[a][None], dim=-1).mean()
                    cells.append(f"({own:.3f})")
                else:
                    cells.append(f"{torch.nn.functional.cosine_similarity(means[a], means[b], dim=0):.3f}")
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines


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


def same_cache_comparison(results: dict, control: dict, control_file: str) -> str:
    """Held-out perplexity (share of the LoRA's gain) of this run's leave-one-out generators next to a control run's
    on the same cache, and the worst seen ratio of each: the difference is the design alone."""
    lines = [
        f'`{control["command"]}`, saved as `benchmarks/results/{control_file}`; "control" is that run, "this" '
        "is this page's.",
        "",
        "| held-out domain | control: from description | this: from description | control: from examples | this: "
        "from examples | model soup of the others | best other-domain LoRA |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(rows: dict, method: str) -> str:
        return f"{rows[method]['perplexity']:.2f} ({rows[method]['recovered']:.0%})"

    for domain, rows in results["unseen"].items():
        other = control["unseen"][domain]
        best = next(method for method in rows if method.startswith("best other"))
        kinds = [cell(run, f"generated from {kind}") for kind in CONDITION_KINDS for run in (other, rows)]
        soup = cell(rows, "model soup of the other domains")
        lines.append(f"| {domain} | " + " | ".join([*kinds, soup, cell(rows, best)]) + " |")
    lines.append("")
    for kind in CONDITION_KINDS:
        method = f"generated ({kind}, mean)"
        worst = [max(ratios_to_original(run, method).values()) for run in (control, results)]
        lines.append(f"- Seen, {kind}: worst generated / original PPL {worst[0]:.4f} (control), {worst[1]:.4f} (this)")
    return "\n".join(lines)


def markdown(
    results: dict,
    settings: Settings,
    preset: str,
    notes: str | None = None,
    sweep: str | None = None,
    history: str | None = None,
    same_cache: str | None = None,
    images=(),
) -> str:
    """The markdown report: targets, notes, seen / memorisation / unseen / fusion / cost tables, plots, settings."""
    seen, k = results["seen"], settings.best_of_k
    model = base_model_name(settings)
    on_model = "" if settings.base_model == DEFAULT_BASE_MODEL else f" on {model}"
    lines = [f"# Benchmark `{preset}`{on_model}: generated LoRAs vs originals, merges and controls", ""]
    lines += [
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']}. Versions: "
        + ", ".join(f"{name} {version}" for name, version in results["versions"].items())
        + f". Wall time {results['wall_seconds'] / 60:.1f} min (caches as found at start: {results['cache_note']}).",
        "",
        "Held-out perplexity (lower is better) on each domain's test split; bits per character in the JSON. "
        "`desc` = conditioned on the task description (all-MiniLM-L6-v2); `ex` = in-context task vector (ICM-LoRA "
        f"Eq. 1, {FAMILY_NAMES.get(settings.base_model, model)} hidden states over a few training texts). `mean` "
        "decodes z = 0; `best of k` draws k samples and keeps the best on the validation split. `shuffled` = "
        "generated from the next domain's condition.",
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
    if same_cache:
        lines += ["", "## Against a control run on the same cache (leave one out)", "", same_cache]
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
    if results.get("points"):
        lines += [
            "",
            "## Task vectors: cosine between domains (in brackets: one example's vector to its domain's mean)",
        ]
        lines += task_vector_table(results["points"])
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
