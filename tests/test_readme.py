"""The README's quickstart must run as written."""

import re
from pathlib import Path

from peft import get_peft_model
from peft.utils import set_peft_model_state_dict

from peft_cvae.testing_utils import tiny_llama
from tests.testing_utils import tiny_lora_config

README = Path(__file__).parent.parent / "README.md"


def quickstart_code() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quickstart", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quickstart_runs_as_written(bank, tmp_path, monkeypatch):
    # The quickstart reads four saved PEFT adapters; make them from the test bank's real checkpoints.
    for name, checkpoint in zip(["sport-100", "sport-120", "tech-100", "tech-120"], bank.checkpoints[:8:2]):
        model = get_peft_model(tiny_llama(), tiny_lora_config())
        set_peft_model_state_dict(model, checkpoint.state_dict)
        model.save_pretrained(tmp_path / "loras" / name)
    monkeypatch.chdir(tmp_path)

    exec(compile(quickstart_code(), str(README), "exec"), {})

    from peft import PeftModel

    result = PeftModel.from_pretrained(tiny_llama(), "generated-sport-lora").load_adapter(
        "generated-sport-lora", adapter_name="again"
    )
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert (tmp_path / "sport-tech-generator" / "model.safetensors").is_file()
