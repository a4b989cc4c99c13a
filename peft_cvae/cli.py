"""`peft-cvae`: the command line, one command per step from "data for several tasks" to "generated LoRA adapters".

    peft-cvae collect  --spec tasks.json --base-model BASE --output bank     # fine-tune a LoRA per task -> LoraBank
    peft-cvae train    bank --output generator                               # LoraBank -> PeftCVAEGenerator
    peft-cvae generate generator --description "..." --output adapter        # task -> PEFT adapter folder
    peft-cvae evaluate --base-model BASE --adapter NAME=adapter --texts a.txt b.txt   # perplexity, bits per char
    peft-cvae info     bank | generator | adapter                            # what a folder contains
    peft-cvae plot     bank | generator --output plots                       # PNG figures

Every command is a thin layer over the library (`LoraCheckpointCallback` inside a `transformers.Trainer`,
`train_generator`, `generate_adapter`, `evaluate_language_model`, `peft_cvae.plotting`), so what the CLI does a
script can do too. User mistakes (a missing file, a malformed task spec, an adapter that does not fit) end with one
line on stderr and exit status 2, never a traceback; bugs still show their traceback.

The task spec of `collect` is a JSON list with one object per task:

    [
      {"name": "sport", "description": "match reports", "files": ["sport/*.txt"]},
      {"name": "code", "description": "Python code", "dataset": "json", "data_files": "code.jsonl",
       "text_column": "text", "split": "train"}
    ]

`files` are text files (glob patterns allowed), each one document; `dataset` is anything `datasets.load_dataset`
accepts (a local folder, a packaged builder such as "json" with `data_files`, or a Hub id when online). Relative
paths are relative to the spec file.
"""

import argparse
import glob
import json
import logging
import math
import os
import sys
import textwrap
import time
from pathlib import Path

import torch

from .errors import PeftCVAEError

__all__ = ["CLIError", "build_parser", "main"]

logger = logging.getLogger(__name__)

PROG = "peft-cvae"
GENERATOR_HISTORY_NAME = "training_history.json"
USER_ERROR_EXIT_CODE = 2


class CLIError(PeftCVAEError, ValueError):
    """A mistake in what was asked of the command line (bad spec file, conflicting flags, ...)."""


# ---- small helpers -------------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def _existing_path(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise CLIError(f"The {what} {path} does not exist. Check the path.")
    return path


def _model_path(name_or_path: str) -> str:
    """An existing local folder as an absolute path (so it is recorded in configs usefully); else unchanged."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CLIError(
            f"{path} is not UTF-8 text ({error.reason} at byte {error.start}). Convert it to UTF-8."
        ) from error


def _text_files(patterns: list[str], base: Path | None = None) -> list[Path]:
    """Files named by paths, folders (their *.txt files) or glob patterns, in a stable order."""
    files: list[Path] = []
    for pattern in patterns:
        pattern = str(Path(pattern).expanduser()) if base is None else str(base / Path(pattern).expanduser())
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise CLIError(f"No file matches {pattern!r}. Check the pattern.")
        for match in map(Path, matches):
            if match.is_dir():
                files.extend(sorted(match.glob("*.txt")))
            elif match.is_file():
                files.append(match)
            else:
                raise CLIError(f"The text file {match} does not exist. Check the path.")
    if not files:
        raise CLIError(f"No text files found in {', '.join(patterns)}.")
    return files


def _load_base_model(name_or_path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a causal LM folder or Hub id; the tokenizer gets a pad token if it has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CLIError(
            f"Cannot load the base model {name_or_path!r} ({first_line}). Pass a folder holding a transformers causal "
            "LM and its tokenizer (config.json, weights, tokenizer files)."
        ) from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return model.eval(), tokenizer


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    """A plain text table with aligned columns (the first left-aligned, the others right-aligned)."""
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]

    def line(cells):
        return "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(cells, widths))
        )

    print(line(header))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print(line(row))


def _human_size(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} GB"


def _folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


# ---- collect -------------------------------------------------------------------------------------------------------
def _collect_arguments(args):
    from dataclasses import fields

    from .collect import CollectArguments

    values = {field.name: getattr(args, field.name) for field in fields(CollectArguments)}
    if values["text_encoder"]:
        values["text_encoder"] = _model_path(values["text_encoder"])  # recorded in the bank: an absolute folder
    return CollectArguments(**values)


def cmd_collect(args) -> int:
    from .collect import check_tasks, collect_bank, read_task_spec

    spec_path = _existing_path(args.spec, "task spec")
    tasks = read_task_spec(spec_path)  # every task's data read and checked before any training
    collect_args = _collect_arguments(args)
    check_tasks(tasks, collect_args)
    base_model, tokenizer = _load_base_model(args.base_model)
    print(
        f"Fine-tuning {len(tasks)} LoRA(s) on {args.base_model} (r={collect_args.lora_r}, "
        f"{', '.join(collect_args.target_modules)})"
    )

    def summary(task, result):
        what = f"{result.num_sequences} blocks of {collect_args.max_length} tokens"
        if task.examples is not None:
            what = f"{result.num_sequences} examples"
        loss = f"loss {result.loss:.3f} (mean of the last 10% of steps), " if result.loss is not None else ""
        print(
            f"  {task.name}: {what}, {collect_args.steps} steps, {loss}{len(result.steps)} checkpoints kept "
            f"(steps {result.steps[0]}..{result.steps[-1]}), {result.train_seconds:.0f} s"
        )

    bank = collect_bank(base_model, tokenizer, tasks, collect_args, on_task_end=summary)
    bank.save_pretrained(args.output)
    print(f"Wrote a bank of {len(bank)} checkpoints of {len(bank.task_names)} tasks to {args.output}")
    return 0


# ---- train ---------------------------------------------------------------------------------------------------------
GENERATOR_SIZE_FLAGS = (
    "latent_size",
    "hidden_channels",
    "num_layers",
    "patch_size",
    "kernel_size",
    "kl_weight",
    "task_memory",
)


def cmd_train(args) -> int:
    from .data import LoraBank
    from .modeling_peft_cvae import PeftCVAEGenerator
    from .training import train_generator

    bank = LoraBank.from_pretrained(_existing_path(args.bank, "bank folder"))
    overrides = {name: getattr(args, name) for name in GENERATOR_SIZE_FLAGS if getattr(args, name) is not None}
    generator = PeftCVAEGenerator.from_bank(bank, **overrides)
    # Under `accelerate launch` / torchrun, print from rank 0 only. (Not PartialState().print: creating the shared
    # state before train_generator's Accelerator would fix it to one process when ACCELERATE_USE_CPU=1.)
    say = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *args, **kwargs: None)
    say(
        f"Training a generator ({generator.num_parameters():,} parameters) on {len(bank)} checkpoints of "
        f"{len(bank.task_names)} tasks for {args.epochs} epochs"
    )
    start = time.perf_counter()
    # train_generator writes the generator, training_history.json and (with checkpoint_every) resumable
    # checkpoints under OUTPUT/checkpoints/, from the main process only.
    history = train_generator(
        generator,
        bank,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.log_with,
        project_dir=args.project_dir,
        output_dir=args.output,
        checkpoint_every=args.checkpoint_every,
        keep_last_checkpoints=args.keep_last_checkpoints,
        resume_from=args.resume,
    )
    if history:
        seconds = time.perf_counter() - start
        say(f"Loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f} in {seconds:.0f} s")
    say(f"Wrote the generator to {args.output}")
    return 0


# ---- generate ------------------------------------------------------------------------------------------------------
def _read_examples(path: Path) -> list[str]:
    """Example texts: a JSON list of strings, or a text file with one example per non-empty line."""
    text = _read_text(path)
    if path.suffix == ".json":
        try:
            examples = json.loads(text)
        except json.JSONDecodeError as error:
            raise CLIError(f"The examples file {path} is not valid JSON: {error}.") from error
        if not isinstance(examples, list) or not all(isinstance(example, str) for example in examples):
            raise CLIError(f"The examples file {path} must hold a JSON list of strings.")
    else:
        examples = text.splitlines()
    examples = [example.strip() for example in examples if example.strip()]
    if not examples:
        raise CLIError(f"The examples file {path} holds no example text.")
    return examples


def _condition(args, generator):
    """The task argument of generate_adapter: a training task's name, or an encoded description / examples."""
    from .errors import UnknownTaskError
    from .task_encoding import load_task_encoder

    names = generator.config.task_names
    if args.task is not None:
        if args.task not in names:
            raise UnknownTaskError(
                f"Unknown task {args.task!r}; this generator was trained on {names}. Pass one of those, or describe "
                "a new task with --description / --examples."
            )
        return args.task
    spec = generator.config.condition_encoder
    if not spec:
        raise CLIError(
            "This generator does not record which encoder made its task vectors, so a description or examples cannot "
            f"be encoded. Use --task with one of {names}."
        )
    kind = spec.get("kind")
    if args.description is not None and kind != "text":
        raise CLIError(
            f"This generator was trained on {kind} task vectors (in-context examples), not on descriptions. Pass "
            "--examples FILE with a few texts of the task."
        )
    if args.examples is not None and kind != "hidden_state":
        raise CLIError(
            f"This generator was trained on {kind} task vectors (descriptions), not on in-context examples. Pass "
            "--description TEXT."
        )
    if args.description is not None:
        return load_task_encoder(spec).encode(args.description)
    examples = _read_examples(_existing_path(args.examples, "examples file"))
    base_model = tokenizer = None
    if args.base_model:
        base_model, tokenizer = _load_base_model(args.base_model)
    return load_task_encoder(spec, base_model=base_model, tokenizer=tokenizer).encode(examples)


def cmd_generate(args) -> int:
    from .modeling_peft_cvae import PeftCVAEGenerator

    generator = PeftCVAEGenerator.from_pretrained(_model_path(args.generator)).eval()  # a folder or a Hub repo id
    task = _condition(args, generator)
    adapters = generator.generate_adapter(
        task, num_samples=args.num_samples, seed=args.seed, temperature=args.temperature
    )
    adapters = adapters if isinstance(adapters, list) else [adapters]
    output = Path(args.output)
    folders = [output] if len(adapters) == 1 else [output / f"sample-{index:02d}" for index in range(len(adapters))]
    for adapter, folder in zip(adapters, folders):
        adapter.save_pretrained(folder)
        print(f"Wrote a PEFT LoRA adapter to {folder}")
    return 0


# ---- evaluate ------------------------------------------------------------------------------------------------------
def _named_adapters(specs: list[str]) -> dict[str, Path]:
    adapters = {}
    for spec in specs:
        name, separator, path = spec.partition("=")
        if not separator:
            name, path = Path(spec).name, spec
        if not name or name in adapters or name == "base":
            raise CLIError(f"Adapter name {name!r} is empty, repeated or 'base'; name them NAME=PATH.")
        adapters[name] = _existing_path(path, f"adapter folder of {name!r}")
    return adapters


def evaluate_adapters(
    base_model_path: str,
    adapters: dict[str, str | os.PathLike],
    texts: list[str],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    bf16: bool = False,
) -> dict[str, dict]:
    """Perplexity and bits per character of the base model and of each adapter on `texts`.

    Returns:
        `{"base": metrics, name: metrics, ...}` with the metrics of `peft_cvae.evaluation.evaluate_language_model`.
    """
    from .evaluation import evaluate_language_model

    base_model, tokenizer = _load_base_model(base_model_path)
    options = {"max_length": max_length, "batch_size": batch_size, "autocast_dtype": torch.bfloat16 if bf16 else None}
    results = {"base": evaluate_language_model(base_model, tokenizer, texts, **options)}
    model = base_model
    for name, path in adapters.items():
        model = _load_adapter_checked(model, path, name, base_model_path)
        results[name] = evaluate_language_model(model, tokenizer, texts, **options)
    return results


def _load_adapter_checked(model, path, name: str, base_model_path: str):
    """Add the PEFT adapter at `path` to `model` (a base model or a PeftModel) as `name` and make it active.

    Unlike `PeftModel.from_pretrained`, which only warns about missing keys, every LoRA tensor of the model's new
    adapter must be filled from the file and every tensor of the file must be used; anything else is a clear error.
    """
    from peft import PeftConfig, PeftModel, get_peft_model
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    from .errors import LayoutMismatchError

    try:
        config = PeftConfig.from_pretrained(str(path))
        if isinstance(model, PeftModel):
            model.add_adapter(name, config)
        else:
            model = get_peft_model(model, config, adapter_name=name)
        result = set_peft_model_state_dict(model, load_peft_weights(str(path)), adapter_name=name)
    except (RuntimeError, ValueError, KeyError) as error:  # shape mismatches, target modules not in the model, ...
        raise LayoutMismatchError(
            f"The adapter {path} does not fit the base model {base_model_path}: {str(error).splitlines()[0]} "
            "Evaluate it with the base model it was trained for."
        ) from error
    missing = [key for key in result.missing_keys if f".{name}." in key and "lora_" in key]
    if missing or result.unexpected_keys:
        raise LayoutMismatchError(
            f"The adapter {path} does not fit the base model {base_model_path} ({len(missing)} missing and "
            f"{len(result.unexpected_keys)} unexpected keys). Evaluate it with the base model it was trained for."
        )
    model.set_adapter(name)
    return model


def cmd_evaluate(args) -> int:
    from .file_utils import write_json

    files = _text_files(args.texts)
    texts = [text for text in (_read_text(file).strip() for file in files) if text]
    if args.max_chars:
        texts = [text[: args.max_chars] for text in texts]
    if not texts:
        raise CLIError("Every text file is empty; pass files with text to score.")
    adapters = _named_adapters(args.adapter or [])
    results = evaluate_adapters(
        args.base_model, adapters, texts, max_length=args.max_length, batch_size=args.batch_size, bf16=args.bf16
    )
    print(f"{len(texts)} texts, {sum(map(len, texts)):,} characters, windows of {args.max_length} tokens")
    rows = [
        [name, f"{metrics['perplexity']:.3f}", f"{metrics['bits_per_character']:.4f}", f"{metrics['num_tokens']:,}"]
        for name, metrics in results.items()
    ]
    _print_table(["model", "perplexity", "bits/char", "tokens"], rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json({"texts": [str(file) for file in files], "results": results}, args.json)
    return 0


# ---- info ----------------------------------------------------------------------------------------------------------
def _bank_conditions(bank) -> dict:
    """The condition vectors a bank has, by task (a bank may lack some until they are set)."""
    from .errors import UnknownTaskError

    conditions = {}
    for task in bank.task_names:
        try:
            conditions[task] = bank.condition(task)
        except UnknownTaskError:
            continue
    return conditions


def _layout_lines(layout) -> list[str]:
    config = layout.lora_config
    return [
        f"base model:      {config.get('base_model_name_or_path')}",
        f"LoRA:            r={config.get('r')}, alpha={config.get('lora_alpha')}, "
        f"targets={config.get('target_modules')}",
        f"layout:          {len(layout.keys)} tensors, {layout.numel:,} parameters ({layout.dtype})",
    ]


def cmd_info(args) -> int:
    from .data import BANK_MANIFEST_NAME, LoraBank
    from .layout import LoraLayout

    path = _existing_path(args.path, "folder")
    if (path / BANK_MANIFEST_NAME).is_file():
        bank = LoraBank.from_pretrained(path)
        lines = [f"LoRA bank:       {path} ({_human_size(_folder_size(path))})", *_layout_lines(bank.layout)]
        lines.append(
            f"encoder:         {json.dumps(bank.condition_encoder) if bank.condition_encoder else 'not recorded'}"
        )
        sizes = {task: condition.numel() for task, condition in _bank_conditions(bank).items()}
        lines.append(
            f"conditions:      {len(sizes)} of {len(bank.task_names)} tasks, size {set(sizes.values()) or '-'}"
        )
        lines.append(f"checkpoints:     {len(bank)}")
        for task in bank.task_names:
            steps = [checkpoint.step for checkpoint in bank.checkpoints_of(task)]
            lines.append(
                f"  {task}: {len(steps)} checkpoints (steps {steps}) - {bank.description(task) or 'no description'}"
            )
    elif (path / "config.json").is_file() and json.loads(_read_text(path / "config.json")).get(
        "model_type"
    ) == "peft_cvae":
        from .modeling_peft_cvae import PeftCVAEGenerator

        generator = PeftCVAEGenerator.from_pretrained(str(path))
        config = generator.config
        lines = [f"generator:       {path} ({_human_size(_folder_size(path))})", *_layout_lines(config.lora_layout)]
        lines.append(
            f"encoder:         {json.dumps(config.condition_encoder) if config.condition_encoder else 'not recorded'}"
        )
        lines.append(f"condition size:  {config.condition_size}")
        lines.append(
            f"network:         {generator.num_parameters():,} parameters; latent {config.latent_size}, "
            f"{config.hidden_channels} channels, {config.num_layers} layers, patch {config.patch_size} "
            f"({config.num_tokens} tokens)"
        )
        history_file = path / GENERATOR_HISTORY_NAME
        if history_file.is_file():
            record = json.loads(_read_text(history_file))
            history = record.get("history") or []
            if history:
                first, last = history[0]["loss"], history[-1]["loss"]
                lines.append(f"training:        {len(history)} epochs, loss {first:.4f} -> {last:.4f}")
        lines.append(f"tasks:           {len(config.task_names)}")
        for name, description in zip(config.task_names, config.task_descriptions):
            lines.append(f"  {name}: {description or 'no description'}")
    elif (path / "adapter_config.json").is_file():
        layout = LoraLayout.from_pretrained(path)
        lines = [f"PEFT adapter:    {path} ({_human_size(_folder_size(path))})", *_layout_lines(layout)]
    else:
        raise CLIError(
            f"{path} is not a LoRA bank (bank.json), a peft-cvae generator (config.json of model_type peft_cvae) or "
            "a PEFT adapter (adapter_config.json)."
        )
    print("\n".join(lines))
    return 0


# ---- plot ----------------------------------------------------------------------------------------------------------
def cmd_plot(args) -> int:
    from .data import BANK_MANIFEST_NAME, LoraBank
    from .plotting import plot_task_vectors, plot_training_loss

    path = _existing_path(args.path, "folder")
    output = Path(args.output)
    written = []
    if (path / BANK_MANIFEST_NAME).is_file():
        bank = LoraBank.from_pretrained(path)
        written.append(plot_task_vectors(bank, output / "checkpoints.png", method=args.method))
        conditions = _bank_conditions(bank)
        if conditions:
            written.append(plot_task_vectors(conditions, output / "task_vectors.png", method=args.method))
    elif (path / "config.json").is_file():
        from .modeling_peft_cvae import PeftCVAEGenerator

        generator = PeftCVAEGenerator.from_pretrained(str(path)).eval()
        history_file = path / GENERATOR_HISTORY_NAME
        if history_file.is_file():
            written.append(
                plot_training_loss(json.loads(_read_text(history_file))["history"], output / "training_loss.png")
            )
        samples = {}
        for task in generator.config.task_names:
            adapters = generator.generate_adapter(task, num_samples=args.samples, seed=args.seed)
            adapters = adapters if isinstance(adapters, list) else [adapters]
            samples[task] = torch.stack([generator.config.lora_layout.flatten(a.state_dict) for a in adapters])
        written.append(
            plot_task_vectors(
                samples, output / "generated.png", method=args.method, title="Generated LoRAs, coloured by task"
            )
        )
    else:
        raise CLIError(f"{path} is neither a LoRA bank (bank.json) nor a peft-cvae generator (config.json).")
    for file in written:
        print(f"Wrote {file}")
    return 0


COLLECT_SPEC_HELP = """\
task spec (JSON; relative paths are relative to the spec file):
  [
    {"name": "sport", "description": "match reports", "files": ["sport/*.txt"]},
    {"name": "code", "description": "Python code", "dataset": "json",
     "data_files": "code.jsonl", "text_column": "text", "split": "train"},
    {"name": "sums", "description": "adding numbers",
     "examples": [{"input": "2 + 2", "target": "4"}]},
    {"name": "logic", "task_json": "bigbench/logical_deduction/task.json"}
  ]
  files: text files, folders of *.txt or glob patterns, each file one document.
  dataset: anything datasets.load_dataset accepts (a local folder, a builder such as
  "json" with data_files, a Hub id when online); text_column defaults to "text".
  examples: prompt/answer pairs, trained on the answer only; the prompt is
  input_prefix + input + output_prefix (default "\\nQ: " and "\\nA: ", as BIG-bench);
  {"input", "target_scores": {choice: score}} is a multiple-choice example.
  task_json: a BIG-bench JSON task (its description, examples and prefixes).
  Task names are folder names: no '/', '\\', '..' or control characters.
"""


# ---- the parser ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train a conditional VAE on LoRA checkpoints of one base model and generate new LoRA adapters.",
        epilog="Run `peft-cvae COMMAND --help` for the options of a command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    collect = commands.add_parser(
        "collect",
        help="fine-tune a LoRA per task and collect its checkpoints into a bank",
        description=textwrap.fill(  # filled here: the raw formatter (for the spec example below) keeps lines as given
            "Fine-tune one LoRA per task of a spec file with transformers.Trainer, keep the checkpoints of the last "
            "part of training (LoraCheckpointCallback), encode each task into a condition vector, and write a LoRA "
            "bank folder.",
            width=88,
        ),
        epilog=COLLECT_SPEC_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    collect.add_argument("--spec", required=True, help="JSON task spec: [{name, description, files | dataset}, ...]")
    collect.add_argument("--base-model", required=True, help="folder (or Hub id) of the causal LM and its tokenizer")
    collect.add_argument("--output", required=True, help="bank folder to write")
    collect.add_argument("--lora-r", type=_positive_int, default=8, help="LoRA rank (default: %(default)s)")
    collect.add_argument("--lora-alpha", type=_positive_float, default=None, help="LoRA alpha (default: 2 * r)")
    collect.add_argument(
        "--target-modules", nargs="+", default=["q_proj", "v_proj"], help="modules to adapt (default: %(default)s)"
    )
    collect.add_argument(
        "--steps", type=_positive_int, default=120, help="optimiser steps per task (default: %(default)s)"
    )
    collect.add_argument(
        "--lr", type=_positive_float, default=2e-4, help="peak learning rate, cosine decay to 0 (default: %(default)s)"
    )
    collect.add_argument("--batch-size", type=_positive_int, default=8, help="blocks per step (default: %(default)s)")
    collect.add_argument(
        "--max-length", type=_positive_int, default=128, help="tokens per block (default: %(default)s)"
    )
    collect.add_argument(
        "--save-steps", type=_positive_int, default=None, help="keep a checkpoint every N steps (default: steps / 20)"
    )
    collect.add_argument(
        "--last-fraction",
        type=_fraction,
        default=1 / 3,
        help="keep checkpoints of this final share of training (default: 1/3, as ICM-LoRA's last 50 of 150 epochs)",
    )
    collect.add_argument(
        "--condition",
        choices=["text", "in-context"],
        default="text",
        help="task vectors from descriptions (a sentence encoder) or from a few of the task's texts run through the "
        "base model (ICM-LoRA Eq. 1) (default: %(default)s)",
    )
    collect.add_argument("--text-encoder", default=None, help="sentence encoder folder (default: all-MiniLM-L6-v2)")
    collect.add_argument(
        "--num-examples",
        type=_positive_int,
        default=8,
        help="texts per task for --condition in-context (default: %(default)s)",
    )
    collect.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast")
    collect.add_argument("--save-adapters", default=None, help="also write each task's final LoRA to FOLDER/<task>")
    collect.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    collect.set_defaults(handler=cmd_collect)

    train = commands.add_parser(
        "train",
        help="train a generator on a bank",
        description="Train a PeftCVAEGenerator on the checkpoints of a LoRA bank (accelerate: one CPU, one GPU or "
        "`accelerate launch` for several) and save it as a transformers model folder.",
    )
    train.add_argument("bank", help="bank folder written by `peft-cvae collect` or LoraBank.save_pretrained")
    train.add_argument("--output", required=True, help="generator folder to write")
    train.add_argument("--epochs", type=_positive_int, default=300, help="passes over the bank (default: %(default)s)")
    train.add_argument("--lr", type=_positive_float, default=1e-3, help="peak learning rate (default: %(default)s)")
    train.add_argument(
        "--batch-size", type=_positive_int, default=16, help="checkpoints per batch per process (default: %(default)s)"
    )
    train.add_argument("--gradient-accumulation-steps", type=_positive_int, default=1, help="(default: %(default)s)")
    train.add_argument(
        "--mixed-precision", choices=["no", "fp16", "bf16"], default=None, help="accelerate mixed precision"
    )
    train.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=None,
        help="save a resumable training state every N epochs, under OUTPUT/checkpoints/",
    )
    train.add_argument("--keep-last-checkpoints", type=_positive_int, default=None, help="keep only the newest N")
    train.add_argument(
        "--resume",
        default=None,
        metavar="CHECKPOINT|latest",
        help="continue an interrupted run from a checkpoint folder, or from the newest one in OUTPUT/checkpoints/",
    )
    train.add_argument("--log-with", default=None, help="accelerate tracker, e.g. tensorboard")
    train.add_argument("--project-dir", default=None, help="tracker log folder (default: OUTPUT)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    sizes = train.add_argument_group("network size (defaults: PeftCVAEConfig's)")
    sizes.add_argument("--latent-size", type=_positive_int, default=None, help="length of z")
    sizes.add_argument("--hidden-channels", type=_positive_int, default=None, help="channels of the conv stacks")
    sizes.add_argument(
        "--num-layers", type=_positive_int, default=None, help="conv blocks in encoder and decoder each"
    )
    sizes.add_argument("--patch-size", type=_positive_int, default=None, help="LoRA parameters per token")
    sizes.add_argument("--kernel-size", type=_positive_int, default=None, help="odd conv kernel size")
    sizes.add_argument("--kl-weight", type=_non_negative_float, default=None, help="beta of the KL term")
    sizes.add_argument(
        "--task-memory",
        action="store_true",
        default=None,
        help="keep each task's mean checkpoint in the generator and decode around it (PeftCVAEConfig.task_memory)",
    )
    train.set_defaults(handler=cmd_train)

    generate = commands.add_parser(
        "generate",
        help="write a generated LoRA adapter for a task",
        description="Generate a PEFT LoRA adapter from a trained generator, for a training task (--task), a new task "
        "described in words (--description) or given by a few example texts (--examples).",
    )
    generate.add_argument("generator", help="generator folder (or Hub repo id)")
    which = generate.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="name of a training task")
    which.add_argument("--description", help="a description of the task (generators trained on text conditions)")
    which.add_argument(
        "--examples",
        help="a text file with one example per line, or a JSON list (generators trained on in-context conditions)",
    )
    generate.add_argument("--output", required=True, help="adapter folder to write (sample-NN subfolders if several)")
    generate.add_argument("--base-model", default=None, help="base model for --examples (default: the recorded one)")
    generate.add_argument(
        "--num-samples", type=_positive_int, default=1, help="adapters to draw (default: %(default)s)"
    )
    generate.add_argument("--seed", type=int, default=0, help="latent noise seed (default: %(default)s)")
    generate.add_argument(
        "--temperature",
        type=_non_negative_float,
        default=1.0,
        help="z ~ N(0, T^2 I); 0 decodes the mean (default: %(default)s)",
    )
    generate.set_defaults(handler=cmd_generate)

    evaluate = commands.add_parser(
        "evaluate",
        help="perplexity and bits per character of base vs adapters",
        description="Score the base model and each adapter on text files (each file one text) and print a table of "
        "perplexity and bits per character.",
    )
    evaluate.add_argument("--base-model", required=True, help="folder (or Hub id) of the causal LM and its tokenizer")
    evaluate.add_argument("--texts", nargs="+", required=True, help="text files, folders of *.txt or glob patterns")
    evaluate.add_argument("--adapter", action="append", metavar="NAME=PATH", help="an adapter to score (repeatable)")
    evaluate.add_argument(
        "--max-length", type=_positive_int, default=256, help="tokens per window (default: %(default)s)"
    )
    evaluate.add_argument(
        "--batch-size", type=_positive_int, default=8, help="windows per forward pass (default: %(default)s)"
    )
    evaluate.add_argument(
        "--max-chars", type=_positive_int, default=None, help="cut each text to this many characters"
    )
    evaluate.add_argument("--bf16", action="store_true", help="run the forward passes under bfloat16 autocast")
    evaluate.add_argument("--json", default=None, help="also write the results to this JSON file")
    evaluate.set_defaults(handler=cmd_evaluate)

    info = commands.add_parser(
        "info",
        help="show what a bank, generator or adapter contains",
        description="Print the layout, tasks, sizes and task encoder of a LoRA bank, a generator or a PEFT adapter.",
    )
    info.add_argument("path", help="bank, generator or adapter folder")
    info.set_defaults(handler=cmd_info)

    plot = commands.add_parser(
        "plot",
        help="draw PNG figures of a bank or generator",
        description="For a bank: its checkpoints and task vectors in 2-D, coloured by task (ICM-LoRA Fig. 2). For a "
        "generator: its training loss and generated LoRAs in 2-D.",
    )
    plot.add_argument("path", help="bank or generator folder")
    plot.add_argument("--output", required=True, help="folder for the PNG files")
    plot.add_argument(
        "--method", choices=["tsne", "pca"], default="tsne", help="2-D projection (default: %(default)s)"
    )
    plot.add_argument(
        "--samples", type=_positive_int, default=8, help="generated LoRAs per task (default: %(default)s)"
    )
    plot.add_argument("--seed", type=int, default=0, help="seed of the generated samples (default: %(default)s)")
    plot.set_defaults(handler=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `peft-cvae` command line; return 0 on success, exit with status 2 on a user mistake."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return args.handler(args)
    except (PeftCVAEError, OSError) as error:  # user mistakes: missing files, bad specs, mismatched adapters
        message = " ".join(str(error).split()) or type(error).__name__
        parser.exit(USER_ERROR_EXIT_CODE, f"{PROG} {args.command}: error: {message}\n")


if __name__ == "__main__":
    sys.exit(main())
