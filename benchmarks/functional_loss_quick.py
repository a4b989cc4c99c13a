"""The functional loss (issue 13) on the BIG-bench `quick` preset: its cost per generator step and the answer NLL of
the generated adapters, next to the plain generator trained on the same bank.

Reads the quick preset's cached selection, description conditions and bank LoRAs from `--cache-dir` (run
`benchmarks/bigbench_zero_shot.py --preset quick` first, or copy its cache entries), trains two generators with the
preset's settings (plain CVAE loss; CVAE loss + `--weight` x the answer NLL of the decoded LoRA on
`--examples-per-task` training examples of its task), and scores the adapter each writes from the task description
(z = 0) on the held-out and bank tasks' test examples with the benchmark's own `Scorer`. Writes a JSON report.

    python benchmarks/functional_loss_quick.py --cache-dir benchmarks/cache --output functional_quick.json
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bigbench import pipeline  # noqa: E402
from benchmarks.bigbench.presets import PRESETS, SPLIT_FIELDS  # noqa: E402
from benchmarks.bigbench_zero_shot import _task_from_json  # noqa: E402
from peft_cvae import PeftCVAEGenerator, train_generator  # noqa: E402
from peft_cvae.file_utils import read_json, write_json  # noqa: E402
from peft_cvae.functional_loss import FunctionalLoss  # noqa: E402


def _selection(cache: Path, settings) -> dict:
    """The quick preset's cached selection (the one whose split has its number of bank tasks)."""
    for path in sorted((cache / "selection").glob("*.json")):
        stored = read_json(path)
        if len(stored["split"]["train"]) == settings.max_train_tasks:
            stored["tasks"] = {name: _task_from_json(task) for name, task in stored["tasks"].items()}
            return stored
    raise SystemExit(f"No cached quick-preset selection under {cache / 'selection'} ({SPLIT_FIELDS}).")


def _conditions(cache: Path, names: list[str]) -> dict:
    for path in sorted((cache / "conditions").glob("*.json")):
        stored = read_json(path)
        if all(name in stored["description"] for name in names):
            return {name: torch.tensor(stored["description"][name]) for name in names}
    raise SystemExit(f"No cached description conditions of {names} under {cache / 'conditions'}.")


def _train(bank, settings, functional=None, epochs=None, lr=None) -> tuple[PeftCVAEGenerator, list, float, int]:
    overrides = {"task_memory": False, **settings.generator_overrides}  # the plain decoder, as measured
    generator = PeftCVAEGenerator.from_bank(bank, seed=settings.lora_seed, **overrides)
    epochs = epochs or settings.generator_epochs
    start = time.perf_counter()
    history = train_generator(
        generator, bank, epochs=epochs, lr=lr or settings.generator_lr, batch_size=settings.generator_batch_size,
        seed=settings.lora_seed, functional_loss=functional, show_progress=True,
        early_stopping_patience=0,  # every epoch runs: `steps` below counts them all
    )  # fmt: skip
    seconds = time.perf_counter() - start
    steps = epochs * -(-len(bank) // settings.generator_batch_size)
    return generator, history, seconds, steps


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path(__file__).resolve().parent / "cache")
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--examples-per-task", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's generator_epochs")
    parser.add_argument("--lr", type=float, default=None, help="default: the preset's generator_lr")
    parser.add_argument("--heldout-only", action="store_true", help="score the held-out tasks only")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    settings = PRESETS["quick"]
    from benchmarks.assets import load_smollm2

    base, tokenizer = load_smollm2()
    selection = _selection(args.cache_dir, settings)
    tasks = selection["tasks"]
    bank_tasks = [tasks[path] for path in selection["split"]["train"]]
    heldout = [tasks[path] for path in selection["split"]["heldout"]]
    names = [task.name for task in bank_tasks]
    vectors = _conditions(args.cache_dir, [task.name for task in bank_tasks + heldout])
    loras = pipeline.task_loras(base, tokenizer, bank_tasks, settings, args.cache_dir, what="bank")  # cached
    spec = {"kind": "text", "name_or_path": "sentence-transformers/all-MiniLM-L6-v2"}
    bank = pipeline.condition_bank(loras, vectors, spec, {task.name: task.description for task in bank_tasks})

    functional = FunctionalLoss(
        base, tokenizer, {task.name: task.task_data("train") for task in bank_tasks}, bank.layout,
        examples_per_task=args.examples_per_task, max_length=settings.rules.max_tokens + 1, weight=args.weight,
    )  # fmt: skip
    # The cost of one generated LoRA's functional loss, forward + backward, alone (3 repeats, median).
    vector = bank.vector(0).requires_grad_(True)
    single = []
    for repeat in range(3):
        start = time.perf_counter()
        functional(vector[None], [bank.checkpoints[0].task], step=repeat).backward()
        single.append(time.perf_counter() - start)

    print("one LoRA, forward + backward:", single, flush=True)
    plain, plain_history, plain_seconds, steps = _train(bank, settings, epochs=args.epochs, lr=args.lr)
    trained, history, seconds, _ = _train(bank, settings, functional, epochs=args.epochs, lr=args.lr)

    scorer = pipeline.Scorer(base, tokenizer, bank.layout, settings, args.cache_dir)
    tag = f"w{args.weight}-k{args.examples_per_task}-e{args.epochs or settings.generator_epochs}-lr{args.lr}"
    scores = {}
    groups = (("heldout", heldout),) if args.heldout_only else (("heldout", heldout), ("seen", bank_tasks))
    for group, group_tasks in groups:
        for task in group_tasks:
            row = {"base": scorer.score(task, "base", "base", None)["answer_nll"]}
            for label, generator in (("plain", plain), ("functional", trained)):
                vector = pipeline.generated_vector(generator.eval(), vectors[task.name])
                row[label] = scorer.score(task, f"fn-{label}", f"{tag}-{label}", vector)["answer_nll"]
            scores.setdefault(group, {})[task.name] = row
            print(group, task.name, row, flush=True)
    report = {
        "settings": {
            "weight": args.weight,
            "examples_per_task": args.examples_per_task,
            "epochs": len(history),
            "lr": args.lr or settings.generator_lr,
        },
        "bank": {"tasks": names, "checkpoints": len(bank), "numel": bank.layout.numel},
        "generator_steps": steps,
        "seconds": {
            "functional_loss_one_lora_median": sorted(single)[len(single) // 2],
            "functional_loss_one_lora_all": single,
            "plain_training": plain_seconds,
            "functional_training": seconds,
            "plain_per_step": plain_seconds / steps,
            "functional_per_step": seconds / steps,
        },
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "history": {"plain": plain_history, "functional": history},
        "answer_nll": scores,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(report, args.output)
    print({key: value for key, value in report.items() if key != "history"}, flush=True)
    return report


if __name__ == "__main__":
    main()
