"""`peft-cvae evaluate`: perplexity and bits per character of the base model and adapters on text files."""

from dataclasses import dataclass, field
from pathlib import Path

from ..evaluation import compare_to_first, evaluate_adapters
from ..file_utils import write_json
from ..task_data import read_text_file, text_files
from .utils import CLIError, add_command, dataclass_from, existing_path, print_table


@dataclass
class EvaluateArguments:
    """What to score, on which texts, and how."""

    base_model: str = field(metadata={"help": "folder (or Hub id) of the causal LM and its tokenizer"})
    texts: list[str] = field(metadata={"help": "text files, folders of *.txt or glob patterns"})
    adapter: list[str] | None = field(
        default=None, metadata={"help": "an adapter to score (repeatable)", "action": "append", "metavar": "NAME=PATH"}
    )
    max_length: int = field(default=256, metadata={"help": "tokens per window"})
    batch_size: int = field(default=8, metadata={"help": "windows per forward pass"})
    max_chars: int | None = field(default=None, metadata={"help": "cut each text to this many characters"})
    bf16: bool = field(default=False, metadata={"help": "run the forward passes under bfloat16 autocast"})
    json: str | None = field(default=None, metadata={"help": "also write the results to this JSON file"})
    cache_dir: str = field(
        default="~/.cache/peft_cvae/evaluate",
        metadata={
            "help": "where base-model scores are kept, keyed by the content of the model and texts ('none': off)"
        },
    )

    def __post_init__(self):
        # --adapter is repeatable and takes one or more NAME=PATH each: [[a=x], [b=y, c=z]] -> [a=x, b=y, c=z]
        self.adapter = [
            item for group in self.adapter or [] for item in ([group] if isinstance(group, str) else group)
        ]
        for name in ("max_length", "batch_size", "max_chars"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}.")


def register(commands) -> None:
    add_command(
        commands,
        "evaluate",
        [EvaluateArguments],
        help="perplexity and bits per character of base vs adapters",
        description="Score the base model and each adapter on text files (each file one text) and print a table of "
        "perplexity and bits per character.",
    ).set_defaults(handler=run)


def named_adapters(specs: list[str]) -> dict[str, Path]:
    adapters = {}
    for spec in specs:
        name, separator, path = spec.partition("=")
        if not separator:
            name, path = Path(spec).name, spec
        if not name or name in adapters or name == "base":
            raise CLIError(f"Adapter name {name!r} is empty, repeated or 'base'; name them NAME=PATH.")
        adapters[name] = existing_path(path, f"adapter folder of {name!r}")
    return adapters


def run(namespace) -> int:
    args = dataclass_from(namespace, EvaluateArguments)
    files = text_files(args.texts)
    texts = [text for text in (read_text_file(file).strip() for file in files) if text]
    if args.max_chars:
        texts = [text[: args.max_chars] for text in texts]
    if not texts:
        raise CLIError("Every text file is empty; pass files with text to score.")
    adapters = named_adapters(args.adapter)
    results = evaluate_adapters(
        args.base_model, adapters, texts, max_length=args.max_length, batch_size=args.batch_size, bf16=args.bf16,
        cache_dir=None if args.cache_dir.lower() in ("", "none") else args.cache_dir,
    )  # fmt: skip
    relative = compare_to_first(results)
    print(f"{len(texts)} texts, {sum(map(len, texts)):,} characters, windows of {args.max_length} tokens")
    header = ["model", "perplexity", "bits/char", "tokens"]
    if relative:
        header += [f"vs {next(iter(adapters))}", "gain recovered"]
    rows = []
    for name, metrics in results.items():
        row = [
            name,
            f"{metrics['perplexity']:.3f}",
            f"{metrics['bits_per_character']:.4f}",
            f"{metrics['num_tokens']:,}",
        ]
        if relative:
            share = relative[name]["gain_recovered"]
            row += [f"{relative[name]['perplexity_vs_first']:.3f}x", "-" if share is None else f"{100 * share:.0f}%"]
        rows.append(row)
    print_table(header, rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        record = {"texts": [str(file) for file in files], "results": results, "relative_to_first": relative}
        write_json(record, args.json)
    return 0
