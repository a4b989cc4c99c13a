"""The tutorial's table of `training_history.json` fields names exactly the fields a real run writes."""

import json
import re
from pathlib import Path

from peft_cvae import PeftCVAEGenerator, train_generator
from tests.testing_utils import small_generator_overrides

TUTORIAL = Path(__file__).resolve().parent.parent / "docs" / "tutorial.md"


def documented_fields() -> dict[str, set[str]]:
    section = TUTORIAL.read_text(encoding="utf-8").split("### What `training_history.json` holds", 1)[1]
    table = section.split("\n\n")[2]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    fields: dict[str, set[str]] = {"top": set(), "history": set(), "run": set(), "early_stopping": set()}
    for row in rows:
        name, text = re.match(r"\| `([^`]+)` \| (.*) \|$", row).groups()
        if name.startswith("history[]."):
            fields["history"].add(name.removeprefix("history[]."))
        else:
            fields["top"].add(name)
            if name in ("run", "early_stopping"):
                fields[name] = set(re.findall(r"`(\w+)`", text))
    return fields


def test_documented_history_fields_are_the_written_ones(bank, tmp_path):
    generator = PeftCVAEGenerator.from_bank(bank, **small_generator_overrides())
    train_generator(generator, bank, epochs=2, batch_size=4, show_progress=False, output_dir=tmp_path / "g")
    record = json.loads((tmp_path / "g" / "training_history.json").read_text())
    fields = documented_fields()
    assert set(record) == fields["top"]
    assert all(set(epoch) == fields["history"] for epoch in record["history"])
    assert set(record["run"]) == fields["run"]
    assert set(record["early_stopping"]) == fields["early_stopping"]
