"""Benchmark: ICM-LoRA's Tables 2 and 3 in miniature, with memorisation controls, unseen tasks and fusion.

    python benchmarks/lora_generation.py --preset quick               # 3 domains, small (< 15 min on 2 CPU cores)
    python benchmarks/lora_generation.py --preset full-cpu-converged  # the run of record: 6 domains on a 2-core CPU
    python benchmarks/lora_generation.py --preset full --device cuda  # 7 domains, DESIGN.md §6 protocol sizes
    python benchmarks/lora_generation.py --preset tiny                # tiny Llama, synthetic domains: the smoke test
    python benchmarks/lora_generation.py --preset gemma3              # Gemma-3-270M on 3 domains (~40 min, 2 cores)

`--base-model gemma3-270m` runs any preset on Gemma-3-270M instead of SmolLM2-135M (the `gemma3` preset is sized for
it: its 262k-token LM head makes every token ~4x dearer); its files get the model's name as a suffix.

`full-cpu` (plain CVAE) and `full-cpu-memory` (task memory, 5 checkpoints per domain) are the earlier designs, kept so
their reports can be reproduced; every full report ends its targets with a table comparing all of them.

What it measures (protocol: DESIGN.md §6, issue 4):

1. Bank. For every domain a LoRA (r=8 on q_proj, v_proj of SmolLM2-135M; the same init for every domain) is fine-tuned
   with a learning rate that decays to 0 (cosine), and its checkpoints of the last part of training go into one bank.
   The fine-tuning is the library's own path, `peft_cvae.collect.train_task_lora` (a `transformers.Trainer` with a
   `LoraCheckpointCallback`, as `peft-cvae collect` runs it); results committed before issue 11 came from an earlier
   hand-written AdamW loop (no warm-up, unshuffled blocks), and a rerun trains the LoRAs again.
2. Seen domains. Two generators are trained on all domains: one conditioned on task *descriptions*
   (all-MiniLM-L6-v2, `TextTaskEncoder`) and one on *in-context task vectors* (ICM-LoRA Eq. 1: SmolLM2's last hidden
   state at the last token, averaged over a few training texts, `HiddenStateTaskEncoder`). On held-out text of each
   domain we score perplexity and bits per character of: the base model; the original (final) LoRA; the mean of the
   domain's own checkpoints (what a faithful generator converges to); the generated LoRA (z = 0, and best of k samples
   chosen on the validation split); a model soup (uniform average of all final LoRAs); PEFT's TIES merge of them; the
   training checkpoint nearest to the generated LoRA; that checkpoint plus Gaussian noise of the same norm as the
   generated LoRA's distance to it; the LoRA generated from another domain's condition (shuffled condition). Next to
   them, the L2 / cosine distance of each generated LoRA to its nearest checkpoint and the spread of the domain's own
   checkpoints: a generated LoRA closer to a checkpoint than the checkpoints are to each other is a copy.
3. Unseen domains. Leave one domain out, train on the rest, generate the held-out domain from its description and
   from a few of its texts; compare with the base model, the soup of the other domains and the best other-domain LoRA,
   as the share of the base -> original LoRA perplexity drop recovered.
4. Fusion. `generate_adapter([a, b], weights=[0.5, 0.5], combine=...)` (mixing conditions, or the generated
   parameters) against PEFT's linear and TIES merges of the two original LoRAs, scored on both domains.
5. Cost. Generator bytes vs bank bytes; latency of description -> PEFT files on disk vs PEFT loading the same adapter
   from disk; generator training wall time and peak memory.
6. Targets (issue 4) with PASS / MISS.

Everything expensive is cached under --cache-dir (domain texts, task vectors, each domain's checkpoints, generators and
every perplexity score, keyed by what determines it), so a rerun only redoes what changed and an interrupted run
resumes. Results: JSON under benchmarks/results/, a markdown report (docs/benchmarks.md for the full presets) and PNG
plots (perplexity by method, task vectors, LoRA vectors).

This file is the entry (command line, results and report files); the benchmark's parts are in `benchmarks/lora/`.
"""

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, when run as a script

from benchmarks.assets import BASE_MODELS  # noqa: E402
from benchmarks.lora.plots import plots  # noqa: E402
from benchmarks.lora.protocol import run  # noqa: E402
from benchmarks.lora.report import design_history, markdown, same_cache_comparison  # noqa: E402
from benchmarks.lora.settings import (  # noqa: E402
    DESIGN_HISTORY,
    PRESETS,
    REPORT_PAGES,
    SAME_CACHE_CONTROLS,
    SWEEP_TABLES,
)
from benchmarks.reporting import library_versions, machine_description, publish_report  # noqa: E402
from peft_cvae.file_utils import atomic_directory, read_json, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="sizes and domains (see PRESETS)")
    parser.add_argument("--quick", action="store_true", help="alias of --preset quick")
    parser.add_argument(
        "--base-model",
        choices=sorted(BASE_MODELS),
        default=None,
        help="the base model (default: the preset's; SmolLM2-135M except for --preset gemma3)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "cache", help="where intermediate artefacts live")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "results", help="JSON and PNG results")
    parser.add_argument("--report", type=Path, default=None, help="markdown path (full presets: docs/benchmarks.md)")
    parser.add_argument(
        "--notes",
        type=Path,
        default=None,
        help="markdown for 'Reading the results' (default: notes/PRESET.md)",
    )
    parser.add_argument("--sweep", type=Path, default=None, help="markdown table of design levers to include")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the markdown report from the saved JSON; run nothing"
    )
    args = parser.parse_args(argv)
    preset = "quick" if args.quick else args.preset
    settings = PRESETS[preset]
    prefix = f"lora_generation_{preset}"
    if args.base_model is not None and args.base_model != settings.base_model:
        settings = replace(settings, base_model=args.base_model)
        prefix = f"{prefix}_{args.base_model}"
        preset_page = None  # the preset's docs page holds its own base model's run
    else:
        preset_page = REPORT_PAGES.get(preset)
    json_path = args.output_dir / f"{prefix}.json"
    if args.report_only:
        results = read_json(json_path, what="benchmark results")
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        command = "python benchmarks/lora_generation.py " + " ".join(argv if argv is not None else sys.argv[1:])
        cache_note = "empty" if not args.cache_dir.exists() or not any(args.cache_dir.iterdir()) else "partly filled"
        start = time.perf_counter()
        results, bank, generated = run(settings, args.cache_dir, device)
        results["wall_seconds"] = time.perf_counter() - start
        results["cache_note"] = cache_note
        results["settings"] = asdict(settings)
        results["command"] = command
        results["machine"] = machine_description(device)
        results["versions"] = library_versions()
        args.output_dir.mkdir(parents=True, exist_ok=True)
        write_json(results, json_path)
        with atomic_directory(args.output_dir) as staging:
            plots(results, bank, generated, staging / prefix)
    report = args.report or (ROOT.parent / "docs" / preset_page if preset_page else args.output_dir / f"{prefix}.md")
    notes = args.notes or ROOT / "notes" / f"{preset}.md"
    sweep = args.sweep or (args.output_dir / SWEEP_TABLES[preset] if preset in SWEEP_TABLES else None)
    extra = {
        "notes": notes.read_text(encoding="utf-8") if notes.exists() else None,
        "sweep": sweep.read_text(encoding="utf-8") if sweep and sweep.exists() else None,
        "history": design_history(args.output_dir) if preset in DESIGN_HISTORY else None,
    }
    control = args.output_dir / SAME_CACHE_CONTROLS[preset] if preset in SAME_CACHE_CONTROLS else None
    if control is not None and control.exists():
        saved = read_json(control, what="the same-cache control run")
        extra["same_cache"] = same_cache_comparison(results, saved, control.name)
    images = sorted(args.output_dir.glob(f"{prefix}_*.png"))
    text = publish_report(report, images, lambda links: markdown(results, settings, preset, **extra, images=links))
    print(text)
    return results


if __name__ == "__main__":
    main()
