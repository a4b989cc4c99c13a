"""`peft-cvae collect`: fine-tune one LoRA per task of a spec file and write the bank (`peft_cvae.collect`)."""

import dataclasses
from dataclasses import dataclass, field

from ..collect import CollectArguments, check_tasks, collect_bank, quiet_libraries, read_task_spec
from ..collect_cost import estimate_collect_cost
from .utils import add_command, dataclass_from, existing_path, load_base_model, model_path

SPEC_HELP = """\
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
  test_files (or test_split, another split of a dataset): held-out texts, never
  trained on; the summary then gives their perplexity before and after training.
  Task names are folder names: no '/', '\\', '..' or control characters.
"""


@dataclass
class CollectPaths:
    """Where `collect` reads its tasks and base model and writes the bank."""

    spec: str = field(metadata={"help": "JSON task spec: [{name, description, files | dataset | examples}, ...]"})
    base_model: str = field(metadata={"help": "folder (or Hub id) of the causal LM and its tokenizer"})
    output: str = field(metadata={"help": "bank folder to write"})
    estimate_only: bool = field(
        default=False,
        metadata={"help": "print the disk and time cost per task (time measured on a few steps) and exit"},
    )


def register(commands) -> None:
    add_command(
        commands,
        "collect",
        [CollectPaths, CollectArguments],
        help="fine-tune a LoRA per task and collect its checkpoints into a bank",
        description="Fine-tune one LoRA per task of a spec file with transformers.Trainer, keep the checkpoints of "
        "the last part of training (LoraCheckpointCallback), encode each task into a condition vector, and write a "
        "LoRA bank folder.",
        epilog=SPEC_HELP,
    ).set_defaults(handler=run)


def run(namespace) -> int:
    paths = dataclass_from(namespace, CollectPaths)
    args = dataclass_from(namespace, CollectArguments)
    if args.text_encoder:  # recorded in the bank: an absolute folder, so the bank works from anywhere
        args = dataclasses.replace(args, text_encoder=model_path(args.text_encoder))
    tasks = read_task_spec(existing_path(paths.spec, "task spec"))  # every task read and checked before training
    check_tasks(tasks, args)
    with quiet_libraries():  # no weight-loading bar or warnings: one progress bar per task, then its summary
        base_model, tokenizer = load_base_model(paths.base_model)
    print(
        f"Fine-tuning {len(tasks)} LoRA(s) on {paths.base_model} (r={args.lora_r}, {', '.join(args.target_modules)}"
        f"{f', recipe {args.recipe}' if args.recipe else ''})"
    )
    with quiet_libraries():
        print(estimate_collect_cost(base_model, tokenizer, tasks, args).describe(), flush=True)
    if paths.estimate_only:
        return 0

    def summary(task, result):
        what = f"{result.num_sequences} examples" if task.examples is not None else (
            f"{result.num_sequences} blocks of {args.max_length} tokens"
        )  # fmt: skip
        loss = f"loss {result.loss:.3f} (mean of the last 10% of steps), " if result.loss is not None else ""
        held_out = ""
        if result.held_out_perplexity is not None:
            before, after = result.held_out_perplexity
            held_out = (
                f"held-out perplexity {before:.2f} -> {after:.2f} ({100 * (after - before) / before:+.1f}%, "
                f"{len(task.test_texts)} texts), "
            )
        print(
            f"  {task.name}: {what}, {args.steps} steps, {loss}{held_out}{len(result.steps)} checkpoints kept "
            f"(steps {result.steps[0]}..{result.steps[-1]}), {result.train_seconds:.0f} s",
            flush=True,
        )

    bank = collect_bank(base_model, tokenizer, tasks, args, on_task_end=summary)
    bank.save_pretrained(paths.output)
    print(f"Wrote a bank of {len(bank)} checkpoints of {len(bank.task_names)} tasks to {paths.output}")
    return 0
