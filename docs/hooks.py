"""mkdocs hook: fill `<!-- cli-help: COMMAND -->` markers with the real `peft-cvae COMMAND --help` text.

The CLI reference is therefore always the help text of the installed package, never a hand-kept copy.
"""

import contextlib
import io
import os
import re

MARKER = re.compile(r"<!-- cli-help:\s*(?P<command>[\w-]*)\s*-->")


def _help_text(command: str) -> str:
    from peft_cvae.cli import main

    os.environ.setdefault("COLUMNS", "100")
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.suppress(SystemExit):
        main([command, "--help"] if command else ["--help"])
    return output.getvalue().rstrip()


def on_page_markdown(markdown, page, config, files):
    return MARKER.sub(lambda match: f"```text\n{_help_text(match['command'])}\n```", markdown)
