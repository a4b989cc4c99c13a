"""`peft-cvae`: the command line, one command per step from "data for several tasks" to "generated LoRA adapters".

    peft-cvae collect  --spec tasks.json --base-model BASE --output bank     # fine-tune a LoRA per task -> LoraBank
    peft-cvae train    bank --output generator                               # LoraBank -> PeftCVAEGenerator
    peft-cvae generate generator --description "..." --output adapter        # task -> PEFT adapter folder
    peft-cvae merge    bank --method soup --output soup                      # baseline: soup/TIES/nearest adapter
    peft-cvae evaluate --base-model BASE --adapter NAME=adapter --texts a.txt b.txt   # perplexity, bits per char
    peft-cvae info     bank | generator | adapter                            # what a folder contains
    peft-cvae plot     bank | generator --output plots                       # PNG figures
    peft-cvae demo     generator                                             # an interactive Gradio page

One module per command. Each is a thin layer over the library (`peft_cvae.collect`, `train_generator`,
`generate_adapter`, `merge_adapters`, `evaluate_adapters`, `peft_cvae.plotting`), and its options are the fields of
the library's argument dataclasses (`CollectArguments`, `GeneratorTrainingArguments`, ...) turned into flags by
`transformers.HfArgumentParser`, so defaults and help are written once. Every command also reads `--config FILE`
(JSON or YAML; flags on the command line win). User mistakes (a missing file, a malformed task spec, an adapter that
does not fit) end with one line on stderr and exit status 2, never a traceback; bugs still show their traceback.
"""

import logging
import sys
import warnings

from transformers import HfArgumentParser

from ..errors import PeftCVAEError
from . import collect, demo, evaluate, generate, info, merge, plot, train
from .utils import PROG, CLIError, apply_config_file

__all__ = ["CLIError", "build_parser", "main"]

USER_ERROR_EXIT_CODE = 2
COMMANDS = (collect, train, generate, merge, evaluate, info, plot, demo)  # in the order of the help


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser(
        prog=PROG,
        description="Train a conditional VAE on LoRA checkpoints of one base model and generate new LoRA adapters.",
        epilog="Run `peft-cvae COMMAND --help` for the options of a command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `peft-cvae` command line; return 0 on success, exit with status 2 on a user mistake."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        apply_config_file(parser, argv)
    except (PeftCVAEError, OSError) as error:  # a config file that is missing, unreadable or sets unknown options
        command = next((arg for arg in argv if arg in {module.__name__.rsplit(".", 1)[-1] for module in COMMANDS}), "")
        parser.exit(USER_ERROR_EXIT_CODE, f"{PROG} {command}: error: {' '.join(str(error).split())}\n")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    # peft 0.21's PeftModel.__init__ reads transformers' deprecated `is_gradient_checkpointing`: a FutureWarning on
    # every adapter `evaluate` or `generate --base-model` loads, about the two libraries, that the user cannot act on.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        return args.handler(args)
    except (PeftCVAEError, OSError) as error:  # user mistakes: missing files, bad specs, mismatched adapters
        message = " ".join(str(error).split()) or type(error).__name__
        parser.exit(USER_ERROR_EXIT_CODE, f"{PROG} {args.command}: error: {message}\n")
