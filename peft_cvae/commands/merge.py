"""`peft-cvae merge`: write a baseline adapter from a bank (model soup, TIES, SVD, cat, DARE, nearest task), to compare
with the generated adapter in one `peft-cvae evaluate` call. A thin layer over `peft_cvae.merging.merge_adapters`."""

from dataclasses import dataclass, field

from .utils import CLIError, add_command, dataclass_from, existing_path, load_base_model


@dataclass
class MergeArguments:
    """Which merge, of which checkpoints, written where."""

    output: str = field(metadata={"help": "adapter folder to write"})
    method: str = field(
        default="soup",
        metadata={
            "help": "soup (the element-wise average of the LoRA tensors, the benchmarks' mean of the bank), linear, "
            "ties, svd, cat, ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, "
            "magnitude_prune_svd (PEFT's add_weighted_adapter), "
            "or nearest (the bank task closest to --description)"
        },
    )
    per_task: str = field(
        default="mean", metadata={"help": "per task: the mean of its checkpoints, its last one, or all checkpoints"}
    )
    density: float = field(default=0.5, metadata={"help": "share of values kept by ties/dare/magnitude_prune"})
    svd_rank: int | None = field(default=None, metadata={"help": "rank of the *svd merges (default: largest rank)"})
    base_model: str | None = field(default=None, metadata={"help": "base model (default: the bank's recorded one)"})
    description: str | None = field(default=None, metadata={"help": "the new task, for --method nearest"})

    def __post_init__(self):
        from ..merging import MERGE_METHODS, PER_TASK_MODES

        if self.method not in MERGE_METHODS:
            raise CLIError(f"--method must be one of {', '.join(MERGE_METHODS)}, got {self.method!r}.")
        if self.per_task not in PER_TASK_MODES:
            raise CLIError(f"--per-task must be one of {', '.join(PER_TASK_MODES)}, got {self.per_task!r}.")
        if not 0 < self.density <= 1:
            raise CLIError(f"--density must be in (0, 1], got {self.density!r}.")
        if self.method == "nearest" and not self.description:
            raise CLIError("--method nearest needs --description TEXT (the task to find the closest bank task for).")


def register(commands) -> None:
    parser = add_command(
        commands,
        "merge",
        [MergeArguments],
        help="write a baseline adapter (soup, TIES, nearest task) from a bank",
        description="Merge a bank's LoRAs into one PEFT adapter: a model soup (the element-wise average), PEFT's "
        "add_weighted_adapter (TIES, SVD, cat, DARE, linear), or pick the bank task nearest to a description: the "
        "baselines to compare a generated adapter with (peft-cvae evaluate --adapter soup=... "
        "--adapter generated=...).",
    )
    parser.add_argument("bank", help="LoRA bank folder")
    parser.set_defaults(handler=run)


def run(namespace) -> int:
    from ..data import LoraBank
    from ..merging import merge_adapters

    args = dataclass_from(namespace, MergeArguments)
    bank = LoraBank.from_pretrained(existing_path(namespace.bank, "bank folder"))
    condition = base_model = None
    if args.method == "nearest":
        from ..task_encoding import load_task_encoder

        if not bank.condition_encoder:
            raise CLIError(
                "This bank records no task encoder, so --description cannot be encoded for --method nearest."
            )
        condition = load_task_encoder(bank.condition_encoder).encode(args.description)
    elif args.base_model:
        base_model = load_base_model(args.base_model)[0]
    merged = merge_adapters(
        bank,
        args.method,
        base_model=base_model,
        per_task=args.per_task,
        condition=condition,
        density=args.density,
        svd_rank=args.svd_rank,
    )
    merged.save_pretrained(args.output)
    if args.method == "nearest":
        print(f"Nearest bank task: {merged.sources[0]} (cosine similarity {merged.weights[0]:.3f})")
    print(f"Wrote a {args.method} of {len(merged.sources)} adapter(s) ({args.per_task} per task) to {args.output}")
    return 0
