"""`peft_cvae.cli`: the old home of the command line, kept so `peft_cvae.cli:main` and `python -m peft_cvae.cli` (as
docs/distributed.md launches it under `accelerate launch`) keep working. The commands live in `peft_cvae.commands`."""

import sys

from .commands import CLIError, build_parser, main

__all__ = ["CLIError", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
