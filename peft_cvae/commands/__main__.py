"""`python -m peft_cvae.commands` runs the `peft-cvae` command line."""

import sys

from . import main

sys.exit(main())
