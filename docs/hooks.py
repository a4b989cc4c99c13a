"""The generated parts of the docs: the CLI reference (`docs/cli.md`), the API summary (`docs/api.md`) and the
README's result tables.

Both are committed already filled in, so a checkout (or GitHub's file view) has a readable reference without building
the site, and both are regenerated from the installed package, never kept by hand:

- `<!-- cli-help: COMMAND -->` is followed by the real `peft-cvae COMMAND --help` text (at 100 columns);
- `<!-- api-summary -->` is followed by a table of every name in `peft_cvae.__all__` with the first line of its
  docstring;
- `<!-- results-summary -->` is followed by the result tables of `benchmarks/results_summary.py`, made from the
  committed benchmark results (`benchmarks/results/*.json`), so README's numbers are never typed by hand.

Run `python docs/hooks.py` after changing a command's options or a public docstring (`--check` only reports whether the
files are up to date); `tests/test_docs_reference.py` fails when they are not. As an mkdocs hook (`mkdocs.yml`), the
same rendering runs on every build, so the site can never show stale help either.
"""

import contextlib
import io
import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
HELP_COLUMNS = "100"
# A marker, then the block generated after it last time (if any): rendering replaces the block, so it is idempotent.
CLI_MARKER = re.compile(r"<!-- cli-help:\s*(?P<command>[\w-]*)\s*-->\n(?:\n?```text\n.*?\n```\n)?", re.DOTALL)
API_MARKER = re.compile(r"<!-- api-summary -->\n.*?<!-- /api-summary -->\n", re.DOTALL)
RESULTS_MARKER = re.compile(r"<!-- results-summary -->\n.*?<!-- /results-summary -->\n", re.DOTALL)
GENERATED_FILES = (DOCS / "cli.md", DOCS / "api.md", DOCS.parent / "README.md")


def _help_text(command: str) -> str:
    from peft_cvae.cli import main

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS  # argparse wraps at the terminal width: fixed, so the text is reproducible
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.suppress(SystemExit):
            main([command, "--help"] if command else ["--help"])
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return output.getvalue().rstrip()


def _summary_line(value) -> str:
    doc = (getattr(value, "__doc__", None) or "").strip()
    paragraph = doc.split("\n\n")[0]
    # "|" would end the table cell; "[x]" would read as a cross-reference to the site builder
    return " ".join(paragraph.split()).replace("|", "\\|").replace("[", "\\[").replace("]", "\\]")


def api_summary() -> str:
    """A markdown table of the public API: each name of `peft_cvae.__all__`, its kind and its docstring's summary."""
    import inspect

    import peft_cvae

    rows = ["| name | kind | what it is |", "| --- | --- | --- |"]
    for name in peft_cvae.__all__:
        value = getattr(peft_cvae, name)
        if inspect.isclass(value):
            kind = "exception" if issubclass(value, BaseException) else "class"
        else:
            kind = "function"
        rows.append(f"| `peft_cvae.{name}` | {kind} | {_summary_line(value)} |")
    return "\n".join(rows)


def results_summary() -> str:
    """The README's result tables, from the committed benchmark results."""
    root = str(DOCS.parent)
    if root not in sys.path:  # `benchmarks` is a folder of the checkout, not part of the installed package
        sys.path.insert(0, root)
    from benchmarks.results_summary import readme_summary

    return readme_summary()


def render(markdown: str) -> str:
    """`markdown` with every generated part filled in from the installed package and the committed results."""
    markdown = CLI_MARKER.sub(
        lambda match: (
            f"<!-- cli-help:{' ' + match['command'] if match['command'] else ''} -->\n\n```text\n"
            f"{_help_text(match['command'])}\n```\n"
        ),
        markdown,
    )
    markdown = API_MARKER.sub(
        lambda match: f"<!-- api-summary -->\n{api_summary()}\n<!-- /api-summary -->\n", markdown
    )
    return RESULTS_MARKER.sub(
        lambda match: f"<!-- results-summary -->\n{results_summary()}\n<!-- /results-summary -->\n", markdown
    )


def on_page_markdown(markdown, page, config, files):
    return render(markdown)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path in GENERATED_FILES:
        text = path.read_text(encoding="utf-8")
        rendered = render(text)
        if rendered != text:
            stale.append(path)
            if not check:
                path.write_text(rendered, encoding="utf-8")
    if stale:
        print(("Out of date: " if check else "Regenerated: ") + ", ".join(str(path) for path in stale))
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
