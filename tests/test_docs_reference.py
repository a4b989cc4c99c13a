"""The committed CLI and API references (`docs/cli.md`, `docs/api.md`) equal what `python docs/hooks.py` generates
from the package now: a new option, a changed help text or a new public name without regenerating fails here."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


def generated_with() -> tuple[int, int]:
    """The Python version docs/cli.md says its help was generated with (argparse's layout differs between versions)."""
    found = re.search(r"with Python (\d+)\.(\d+)", (DOCS / "cli.md").read_text(encoding="utf-8"))
    return int(found[1]), int(found[2])


@pytest.mark.parametrize("name", ["cli.md", "api.md", "../README.md"])
def test_committed_reference_is_up_to_date(name, monkeypatch):
    if name == "cli.md" and sys.version_info[:2] != generated_with():
        pytest.skip(f"docs/cli.md was generated with Python {generated_with()}; argparse formats help differently")
    monkeypatch.setenv("COLUMNS", "60")  # the hook fixes the width itself, whatever the terminal says
    hooks = load_hooks()
    text = (DOCS / name).read_text(encoding="utf-8")
    assert hooks.render(text) == text, f"docs/{name} is out of date: run `python docs/hooks.py` and commit it"


def test_readme_results_come_from_the_committed_json(tmp_path):
    """The README block is made from the results files: change a number in a copy and the table changes with it."""
    import json
    import shutil

    from benchmarks.results_summary import SIX_DOMAINS, readme_summary

    readme = (DOCS.parent / "README.md").read_text(encoding="utf-8")
    assert "<!-- results-summary -->" in readme and readme_summary() in readme
    for name in (SIX_DOMAINS, "bigbench_zero_shot_quick.json"):
        shutil.copy(DOCS.parent / "benchmarks" / "results" / name, tmp_path / name)
    results = json.loads((tmp_path / SIX_DOMAINS).read_text())
    results["seen"]["sport"]["generated (description, mean)"]["perplexity"] = (
        2 * results["seen"]["sport"]["original LoRA"]["perplexity"]
    )
    (tmp_path / SIX_DOMAINS).write_text(json.dumps(results))
    assert "| sport | " in readme_summary(tmp_path) and " | 2.000 x | " in readme_summary(tmp_path)
    assert " | 2.000 x | " not in readme_summary()


def test_every_command_and_public_name_is_in_the_reference():
    from peft_cvae import __all__ as public
    from peft_cvae.commands import COMMANDS

    cli = (DOCS / "cli.md").read_text(encoding="utf-8")
    for command in COMMANDS:
        name = command.__name__.rsplit(".", 1)[-1]
        assert f"<!-- cli-help: {name} -->\n\n```text\nusage: peft-cvae {name} " in cli
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    assert all(f"| `peft_cvae.{name}` |" in api for name in public)


def test_rendering_replaces_a_stale_block_and_is_idempotent():
    hooks = load_hooks()
    stale = "# x\n\n<!-- cli-help: info -->\n\n```text\nusage: old help\n```\n\nafter\n"
    fresh = hooks.render(stale)
    assert "old help" not in fresh and "usage: peft-cvae info" in fresh and fresh.endswith("\n\nafter\n")
    assert hooks.render(fresh) == fresh
    assert hooks.render("<!-- cli-help: info -->\nafter\n").endswith("```\nafter\n")  # first fill of a bare marker
