"""Design levers of the generator, tried on the cached bank of a benchmark preset (issue 4, "iterate on the design").

    python benchmarks/generator_sweep.py --preset quick     # after `python benchmarks/lora_generation.py --quick`

Each variant is a set of `PeftCVAEGenerator.from_bank` overrides and `train_generator` settings (no package change).
It is trained on the preset's bank with description conditions, and for every domain the LoRA it decodes at z = 0 is
scored on the test split like the benchmark's "generated (description, mean)" and compared with the original LoRA
and with the mean of the domain's own checkpoints; its distance to the nearest training checkpoint is reported next
to the spread of the domain's checkpoints. Generators and scores go into the benchmark's cache, so a rerun is cheap.
Writes `benchmarks/results/generator_sweep_<preset>.json` and a markdown table `..._<preset>.md` that
`lora_generation.py --sweep` includes in the report.
"""

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, when run as a script

from benchmarks.lora.bank import build_checkpoint_bank, conditioned, trained_generator  # noqa: E402
from benchmarks.lora.domains import load_base, task_vectors  # noqa: E402
from benchmarks.lora.scoring import Scorer, memorisation, task_rows  # noqa: E402
from benchmarks.lora.settings import PRESETS  # noqa: E402
from benchmarks.reporting import markdown_table  # noqa: E402
from peft_cvae.file_utils import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent

VARIANTS = {  # name -> settings changed relative to the preset
    "preset": {},
    "patch 32": {"generator_overrides": {"patch_size": 32}},
    "lr 3e-3, 6x epochs": {"generator_lr": 3e-3, "generator_epochs_factor": 6},
    "patch 32, lr 3e-3, 6x epochs": {
        "generator_overrides": {"patch_size": 32},
        "generator_lr": 3e-3,
        "generator_epochs_factor": 6,
    },
    "wider and deeper (64 ch, 6 layers)": {"generator_overrides": {"hidden_channels": 64, "num_layers": 6}},
    # the factorised network (peft_cvae/factorised.py) with the preset's task memory in bfloat16, and with the SVD
    # canonical form (its distances to checkpoints compare canonical factors with raw ones: read its PPL ratio)
    "factorised, bf16 memory": {
        "generator_overrides": {"architecture": "factorised", "task_memory_dtype": "bfloat16"},
    },
    "factorised, bf16 memory, svd": {
        "generator_overrides": {
            "architecture": "factorised",
            "task_memory_dtype": "bfloat16",
            "canonical_form": "svd",
        },
    },
}


def variant_settings(settings, change: dict):
    """The preset's settings with one variant's changes (overrides are merged into the preset's)."""
    change = dict(change)
    factor = change.pop("generator_epochs_factor", 1)
    overrides = {**settings.generator_overrides, **change.pop("generator_overrides", {})}
    return replace(
        settings, generator_overrides=overrides, generator_epochs=settings.generator_epochs * factor, **change
    )


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="quick", help="benchmark preset whose cached bank is used")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "cache")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "results")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names of VARIANTS to run")
    parser.add_argument("--recon-only", action="store_true", help="no perplexity: reconstruction and distances only")
    args = parser.parse_args(argv)
    import torch

    settings = PRESETS[args.preset]
    device = torch.device(args.device)
    base, tokenizer = load_base(settings, device)
    bank = build_checkpoint_bank(base, tokenizer, settings, args.cache_dir)
    conditions, _, spec = task_vectors("description", base, tokenizer, settings, args.cache_dir)
    described = conditioned(bank, settings.domains, conditions, spec)
    vectors, tasks = described.vectors(), [checkpoint.task for checkpoint in described]
    scorer = Scorer(base, tokenizer, bank.layout, settings, args.cache_dir)
    rows = []
    for name in args.variants:
        variant = variant_settings(settings, VARIANTS[name])
        start = time.perf_counter()
        generator, stats = trained_generator(described, variant, args.cache_dir, "all-description")
        row = {
            "variant": name,
            "parameters": generator.num_parameters(),
            "train_seconds": stats["train_seconds"],
            "wall_seconds": time.perf_counter() - start,
            "final_reconstruction_loss": stats["final_reconstruction_loss"],
            "domains": {},
        }
        for domain in settings.domains:
            state = generator.generate_adapter(conditions[domain], temperature=0).state_dict
            distances, _ = memorisation(bank.layout.flatten(state), vectors, tasks, domain)
            row["domains"][domain] = dict(distances)
            if args.recon_only:
                continue
            original = scorer.score(bank.checkpoints_of(domain)[-1].state_dict, domain)["perplexity"]
            own_rows = task_rows(tasks, domain)
            own_mean = scorer.score(bank.layout.unflatten(vectors[own_rows].mean(0)), domain)["perplexity"]
            row["domains"][domain]["ratio_to_original"] = scorer.score(state, domain)["perplexity"] / original
            row["domains"][domain]["own_mean_ratio_to_original"] = own_mean / original
        rows.append(row)
        print(name, row["final_reconstruction_loss"], flush=True)
    write_json({"preset": args.preset, "variants": rows}, args.output_dir / f"generator_sweep_{args.preset}.json")
    table = markdown(rows, args.preset)
    (args.output_dir / f"generator_sweep_{args.preset}.md").write_text(table, encoding="utf-8")
    print(table)
    return rows


def markdown(rows: list[dict], preset: str) -> str:
    intro = (
        f"Generator variants on the `{preset}` bank, description conditions, decoded at z = 0 "
        f"(`python benchmarks/generator_sweep.py --preset {preset}`). Reconstruction MSE is in normalised space "
        "(1.0 = predicting the bank's element-wise mean). Distances (L2) of the generated LoRA to the mean of its "
        "domain's own checkpoints, worst domain, next to that domain's checkpoint spread; PPL ratio to the original "
        "LoRA, worst domain, when scored."
    )
    header = ["variant", "parameters", "train s (wall)", "final recon. MSE", "to own mean (spread)", "worst PPL ratio"]
    cells = []
    for row in rows:
        domains = row["domains"]
        far = max(domains, key=lambda d: domains[d]["generated_to_own_checkpoint_mean"])
        scored = [d for d in domains if "ratio_to_original" in domains[d]]
        worst = max(scored, key=lambda d: domains[d]["ratio_to_original"]) if scored else None
        ratio = f"{worst} {domains[worst]['ratio_to_original']:.4f}" if worst else "not scored"
        cells.append(
            [
                row["variant"],
                f"{row['parameters']:,}",
                f"{row['train_seconds']:.0f}",
                f"{row['final_reconstruction_loss']:.4f}",
                f"{far} {domains[far]['generated_to_own_checkpoint_mean']:.2f} "
                f"({domains[far]['own_checkpoint_spread_mean']:.2f})",
                ratio,
            ]
        )
    return "\n".join([intro, "", markdown_table(header, cells)]) + "\n"


if __name__ == "__main__":
    main()
