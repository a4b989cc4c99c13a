"""The tutorial's command-line path, timed end to end: text files of four BBC News domains -> `peft-cvae collect` ->
`train` -> `generate` -> `merge` -> `evaluate`, each stage the command docs/tutorial.md prints, run as a new user
would run it (issue 16: "<= 20 min of CPU for 4 small domains").

Every stage is a `peft-cvae` subprocess; its wall time and CPU time (user + sys of the child) are measured and written
atomically to WORK/stages/<stage>.json, so an interrupted run resumes at the stage it was on. Two extra stages measure
what the tutorial cost before issue 16 changed it, for the before/after comparison; neither is part of the path:

- "collect estimate (flags before)": `collect --estimate-only` with the tutorial's previous flags (120 steps of
  batch 8, `--bf16`): its per-step time measured on this machine times the steps, as `collect` prints it;
- "train (defaults before)": `train` with the early stopping defaults before (patience 20 epochs, 0.1 %).

    python benchmarks/tutorial_path.py                 # about 15-20 min on 2 idle cores
    python benchmarks/tutorial_path.py --report-only   # rewrite the JSON and the page from the cached stages

Writes benchmarks/results/tutorial_path.json and docs/benchmarks_tutorial_path.md.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from benchmarks.assets import minilm_path, smollm2_path  # noqa: E402
from benchmarks.reporting import library_versions, markdown_table  # noqa: E402
from benchmarks.text_domains import load_domain_texts  # noqa: E402
from peft_cvae.file_utils import read_json, write_json  # noqa: E402

DOMAINS = {  # the tutorial's four domains and the descriptions its tasks.json gives them
    "sport": "BBC News articles about sport: matches, players, results and transfers",
    "tech": "BBC News articles about technology: computers, the internet, mobile phones, games and gadgets",
    "business": "BBC News articles about business: companies, markets, the economy and trade",
    "politics": "BBC News articles about UK politics: parliament, parties, elections and government",
}
NEW_DESCRIPTION = "football transfer rumours"
# The tutorial's collect (docs/tutorial.md, section 1, CLI) runs with collect's defaults: 60 steps of 4 blocks of 128
# tokens at lr 1e-3, converged-tail recipe (every step of the last 40 kept). Before issue 16 the tutorial passed
# `--lr 5e-4 --bf16` to the defaults of then, 120 steps of batch 8.
COLLECT_FLAGS = []
COLLECT_FLAGS_BEFORE = ["--steps", "120", "--batch-size", "8", "--lr", "5e-4", "--bf16"]
TRAIN_FLAGS_BEFORE = ["--early-stopping-patience", "20", "--early-stopping-min-delta", "0.001"]
TRAIN_TEXTS, TEST_TEXTS, MAX_CHARS = 40, 20, 1500
PATH_STAGES = ("texts", "collect", "train", "generate", "merge", "evaluate")
DOCS_PAGE = "benchmarks_tutorial_path.md"


def write_texts(work: Path) -> None:
    """Each domain's first 40 train and 20 test texts (cut to 1,500 characters) as one .txt file per text, and the
    tasks.json that names them: the 'text files' a user starts from."""
    spec = []
    for domain, description in DOMAINS.items():
        for split, count in (("train", TRAIN_TEXTS), ("test", TEST_TEXTS)):
            folder = work / "texts" / domain / split
            folder.mkdir(parents=True, exist_ok=True)
            for index, text in enumerate(load_domain_texts(domain, split, max_chars=MAX_CHARS, max_texts=count)):
                (folder / f"{index:03d}.txt").write_text(text, encoding="utf-8")
        spec.append(
            {
                "name": domain,
                "description": description,
                "files": [f"texts/{domain}/train/*.txt"],
                "test_files": [f"texts/{domain}/test/*.txt"],
            }
        )
    (work / "tasks.json").write_text(json.dumps(spec, indent=1), encoding="utf-8")


def commands(smollm2: str) -> dict[str, list[list[str]]]:
    """The `peft-cvae` command lines of each stage, as the tutorial prints them (run inside the work folder)."""
    return {
        "collect": [["collect", "--spec", "tasks.json", "--base-model", smollm2, "--output", "bank", *COLLECT_FLAGS]],
        "train": [["train", "bank", "--output", "generator", "--no-show-progress"]],
        "generate": [
            ["generate", "generator", "--task", "sport", "--output", "sport-lora"],
            [
                "generate",
                "generator",
                "--description",
                NEW_DESCRIPTION,
                "--output",
                "rumours-lora",
                "--temperature",
                "0",
            ],
        ],  # fmt: skip
        "merge": [["merge", "bank", "--method", "soup", "--output", "soup-lora"]],
        "evaluate": [
            [
                "evaluate",
                "--base-model",
                smollm2,
                "--texts",
                "texts/sport/test/*.txt",
                "--adapter",
                "generated=sport-lora",
                "--adapter",
                "rumours=rumours-lora",
                "--adapter",
                "soup=soup-lora",
                "--max-length",
                "128",
                "--json",
                "scores.json",
                "--cache-dir",
                "evaluate-cache",
            ],
        ],  # fmt: skip
        "collect estimate (flags before)": [
            [
                "collect",
                "--spec",
                "tasks.json",
                "--base-model",
                smollm2,
                "--output",
                "bank-before",
                "--estimate-only",
                *COLLECT_FLAGS_BEFORE,
            ],
        ],  # fmt: skip
        "train (defaults before)": [
            ["train", "bank", "--output", "generator-before", "--no-show-progress", *TRAIN_FLAGS_BEFORE]
        ],
    }


def run_stage(name: str, work: Path, lines: list[list[str]] | None, environment: dict) -> dict:
    """Run one stage (its commands in order), unless its record exists; return the record."""
    record_path = work / "stages" / f"{name}.json"
    if record_path.is_file():
        return read_json(record_path)
    print(f"== {name}", flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    outputs = []
    if lines is None:  # the texts stage runs in this process
        write_texts(work)
    for line in lines or []:
        command = [sys.executable, "-m", "peft_cvae.cli", *line]
        # stdout (the command's summary) is kept in the record; stderr (progress bars, warnings) shows as it runs
        finished = subprocess.run(command, cwd=work, env=environment, stdout=subprocess.PIPE, text=True)
        print(finished.stdout[-3000:], flush=True)
        if finished.returncode:
            raise SystemExit(f"Stage {name!r} failed (exit {finished.returncode}): peft-cvae {' '.join(line)}")
        outputs.append(finished.stdout)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    record = {
        "commands": ["peft-cvae " + " ".join(line) for line in lines or []],
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "load_average_at_start": os.getloadavg()[0],
        "stdout": outputs,
    }
    record_path.parent.mkdir(exist_ok=True)
    write_json(record, record_path)
    return record


def summarise(work: Path, stages: dict[str, dict]) -> dict:
    path = [stages[name] for name in PATH_STAGES if name in stages]
    history = read_json(work / "generator" / "training_history.json") if (work / "generator").is_dir() else None
    before = work / "generator-before" / "training_history.json"
    return {
        "path_wall_seconds": sum(stage["wall_seconds"] for stage in path),
        "path_cpu_seconds": sum(stage["cpu_seconds"] for stage in path),
        "complete": len(path) == len(PATH_STAGES),
        "train_epochs": len(history["history"]) if history else None,
        "train_epochs_before": len(read_json(before)["history"]) if before.is_file() else None,
        "scores": read_json(work / "scores.json") if (work / "scores.json").is_file() else None,
    }


def markdown(results: dict) -> str:
    stages, summary = results["stages"], results["summary"]
    rows = [
        [name, f"{stages[name]['wall_seconds'] / 60:.1f}", f"{stages[name]['cpu_seconds'] / 60:.1f}",
         "<br>".join(f"`{command}`" for command in stages[name]["commands"]) or "(Python: write the text files)"]
        for name in PATH_STAGES if name in stages
    ]  # fmt: skip
    rows.append(["**path total**", f"**{summary['path_wall_seconds'] / 60:.1f}**",
                 f"**{summary['path_cpu_seconds'] / 60:.1f}**", ""])  # fmt: skip
    lines = [
        "# The tutorial's path, timed",
        "",
        "Generated by `python benchmarks/tutorial_path.py` from `benchmarks/results/tutorial_path.json`; do not edit.",
        "",
        f"Four BBC News domains ({', '.join(DOMAINS)}), {TRAIN_TEXTS} training and {TEST_TEXTS} test texts each "
        f"(cut to {MAX_CHARS:,} characters), SmolLM2-135M-Instruct, every command as [the tutorial](tutorial.md) "
        "prints it. "
        f"Machine: {results['machine']}; {', '.join(f'{k} {v}' for k, v in results['versions'].items())}.",
        "",
        markdown_table(["stage", "wall (min)", "CPU (min, user + sys)", "commands"], rows),
        "",
    ]
    if "collect" in stages:
        summaries = [line for line in stages["collect"]["stdout"][0].splitlines() if "held-out perplexity" in line]
        lines += ["`collect`'s summary of each task (held-out perplexity of the base model -> its own LoRA):", ""]
        lines += ["```", *summaries, "```", ""]
    if summary["train_epochs"] is not None:
        lines += [f"`train` ran {summary['train_epochs']} epochs with the default early stopping.", ""]
    before = {name: stages[name] for name in stages if name not in PATH_STAGES}
    if before:
        lines += ["## Before issue 16", ""]
        estimate = before.get("collect estimate (flags before)")
        if estimate:
            text = estimate["stdout"][0]
            total = next((line.strip() for line in text.splitlines() if line.startswith("Total for")), "")
            lines += [
                f"The tutorial's previous `collect` (`{' '.join(COLLECT_FLAGS_BEFORE)}`: the defaults of then plus "
                f"its flags), estimated by `collect --estimate-only` on this machine: {total}",
                "",
            ]
        old_train = before.get("train (defaults before)")
        if old_train:
            lines += [
                f"`train` with the early stopping defaults before (`{' '.join(TRAIN_FLAGS_BEFORE)}`) on the same "
                f"bank: {summary['train_epochs_before']} epochs, {old_train['wall_seconds'] / 60:.1f} min wall, "
                f"{old_train['cpu_seconds'] / 60:.1f} CPU-min.",
                "",
            ]
    scores = summary["scores"]
    if scores:
        rows = [
            [name, f"{metrics['perplexity']:.3f}", f"{metrics['bits_per_character']:.4f}"]
            for name, metrics in scores["results"].items()
        ]
        lines += [
            "## What the path produced",
            "",
            f"`evaluate` on the 20 sport test texts (`rumours`: generated from the new description "
            f'"{NEW_DESCRIPTION}"; `soup`: `peft-cvae merge --method soup`):',
            "",
            markdown_table(["model", "perplexity", "bits/char"], rows),
            "",
        ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=ROOT / "cache" / "tutorial_path")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "results")
    parser.add_argument("--docs-dir", type=Path, default=ROOT.parent / "docs")
    parser.add_argument("--report-only", action="store_true", help="rewrite JSON and page from the cached stages")
    parser.add_argument("--skip-before", action="store_true", help="leave out the two 'before issue 16' stages")
    args = parser.parse_args(argv)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    environment = {**os.environ, "PEFT_CVAE_DEFAULT_TEXT_ENCODER_PATH": str(minilm_path())}
    lines = commands(str(smollm2_path()))
    before = [] if args.skip_before else ["collect estimate (flags before)", "train (defaults before)"]
    order = [*PATH_STAGES, *before]
    stages = {}
    for name in order:
        if args.report_only:
            if (work / "stages" / f"{name}.json").is_file():
                stages[name] = read_json(work / "stages" / f"{name}.json")
            continue
        stages[name] = run_stage(name, work, lines.get(name), environment)

    results = {
        "machine": f"{os.cpu_count()} CPU cores, {platform.platform()}",
        "versions": library_versions(),
        "collect_flags": COLLECT_FLAGS,
        "stages": stages,
        "summary": summarise(work, stages),
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(results, args.output_dir / "tutorial_path.json")
    args.docs_dir.mkdir(parents=True, exist_ok=True)
    (args.docs_dir / DOCS_PAGE).write_text(markdown(results), encoding="utf-8")
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
