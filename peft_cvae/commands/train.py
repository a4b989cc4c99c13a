"""`peft-cvae train`: train a generator on a bank (`PeftCVAEGenerator.from_bank` + `train_generator`)."""

import dataclasses
import os
import time
from dataclasses import dataclass, field

from ..configuration_peft_cvae import PeftCVAEConfig
from ..training_args import GeneratorTrainingArguments
from .utils import CLIError, add_command, dataclass_from, existing_path, require


@dataclass
class GeneratorSizeArguments:
    """Network sizes of a new generator; None keeps `PeftCVAEConfig`'s default (shown in the help). `task_memory`
    defaults to True, as in `PeftCVAEGenerator.from_bank`."""

    _argument_group_name = "network size (defaults: PeftCVAEConfig's)"

    latent_size: int | None = field(
        default=None, metadata={"help": f"length of z (default: {PeftCVAEConfig.latent_size})"}
    )
    hidden_channels: int | None = field(
        default=None, metadata={"help": f"channels of the conv stacks (default: {PeftCVAEConfig.hidden_channels})"}
    )
    num_layers: int | None = field(
        default=None,
        metadata={"help": "blocks in encoder and decoder each (default: 12 for the conv network)"},
    )
    patch_size: int | None = field(
        default=None, metadata={"help": f"LoRA parameters per token (default: {PeftCVAEConfig.patch_size})"}
    )
    kernel_size: int | None = field(
        default=None, metadata={"help": f"odd conv kernel size (default: {PeftCVAEConfig.kernel_size})"}
    )
    kl_weight: float | None = field(
        default=None, metadata={"help": f"beta of the KL term (default: {PeftCVAEConfig.kl_weight})"}
    )
    # True as in from_bank: the recommended design. HfArgumentParser adds --no-task-memory for a bool that is True.
    task_memory: bool = field(
        default=True,
        metadata={
            "help": "keep each task's mean checkpoint in the generator and decode around it (the recommended "
            "design; --no-task-memory: the paper's plain CVAE, which on small banks decodes close to the bank mean)"
        },
    )

    def __post_init__(self):
        for name in ("latent_size", "hidden_channels", "num_layers", "patch_size", "kernel_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}.")
        if self.kl_weight is not None and not (
            isinstance(self.kl_weight, (int, float)) and 0 <= self.kl_weight < 1e30
        ):
            raise CLIError(f"--kl-weight must be a finite number >= 0, got {self.kl_weight!r}.")

    def overrides(self) -> dict:
        """The sizes that were set, as `PeftCVAEGenerator.from_bank(bank, **overrides)` takes them."""
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


def register(commands) -> None:
    parser = add_command(
        commands,
        "train",
        [GeneratorTrainingArguments, GeneratorSizeArguments],
        help="train a generator on a bank",
        description="Train a PeftCVAEGenerator on the checkpoints of a LoRA bank (accelerate: one CPU, one GPU or "
        "`accelerate launch` for several) and save it as a transformers model folder.",
    )
    parser.add_argument("bank", help="bank folder written by `peft-cvae collect` or LoraBank.save_pretrained")
    require(parser, "output_dir")  # optional in the library (train in memory), not here
    for action in parser._actions:  # HfArgumentParser gives --no-task-memory the help of --task-memory
        if "--no-task-memory" in action.option_strings:
            action.help = "the paper's plain CVAE, without task memory"
    parser.set_defaults(handler=run)


def run(namespace) -> int:
    from ..data import LoraBank
    from ..modeling_peft_cvae import PeftCVAEGenerator
    from ..training import train_generator

    args = dataclass_from(namespace, GeneratorTrainingArguments)
    sizes = dataclass_from(namespace, GeneratorSizeArguments)
    bank = LoraBank.from_pretrained(existing_path(namespace.bank, "bank folder"))
    generator = PeftCVAEGenerator.from_bank(bank, **sizes.overrides())
    # Under `accelerate launch` / torchrun, print from rank 0 only. (Not PartialState().print: creating the shared
    # state before train_generator's Accelerator would fix it to one process when ACCELERATE_USE_CPU=1.)
    say = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *args, **kwargs: None)
    say(
        f"Training a generator ({generator.num_parameters():,} parameters) on {len(bank)} checkpoints of "
        f"{len(bank.task_names)} tasks for up to {args.epochs} epochs"
    )
    start = time.perf_counter()
    # train_generator writes the generator, training_history.json and (with checkpoint_every) resumable
    # checkpoints under OUTPUT/checkpoints/, from the main process only.
    history = train_generator(generator, bank, args)
    if history:
        seconds = time.perf_counter() - start
        stopped = f" (stopped early: no gain for {args.early_stopping_patience} epochs)"
        stopped = stopped if len(history) < args.epochs else ""
        say(
            f"Loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f} in {len(history)} epochs, "
            f"{seconds:.0f} s{stopped}"
        )
    say(f"Wrote the generator to {args.output_dir}")
    return 0
