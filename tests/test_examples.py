"""The runnable examples in examples/, in their `--quick` mode (tiny models built from configs, offline).

Three run in this process through their `main(argv)` (importing torch and transformers again would cost more than
the examples themselves); the Hub example runs in a subprocess, because it must set HF_ENDPOINT before
huggingface_hub is imported. The LLM example's output (bank, generator, base model) is shared by the two examples
that build on it, as in real use.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from peft_cvae import PeftCVAEGenerator
from peft_cvae.constants import INTEGRITY_NAME

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def examples_on_path():
    sys.path.insert(0, str(EXAMPLES))
    yield
    sys.path.remove(str(EXAMPLES))


@pytest.fixture(scope="module")
def llm_run(examples_on_path, tmp_path_factory):
    """`llm_domain_adapters.py --quick`: LoRAs with Trainer + LoraCheckpointCallback -> bank -> generator."""
    import llm_domain_adapters
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    workdir = tmp_path_factory.mktemp("llm")
    outputs = llm_domain_adapters.main(["--quick", "--output", str(workdir)])
    AcceleratorState._reset_state(reset_partial_state=True)
    return workdir, outputs


def test_llm_domain_adapters(llm_run):
    workdir, outputs = llm_run
    domains = ["sport", "tech", "food"]
    bank = json.loads((workdir / "bank" / "bank.json").read_text())
    assert [task["name"] for task in bank["tasks"]] == domains
    assert {entry["task"] for entry in bank["checkpoints"]} == set(domains) and len(bank["checkpoints"]) >= 6
    assert bank["condition_encoder"]["kind"] == "text"
    generator = PeftCVAEGenerator.from_pretrained(outputs["generator"])
    assert generator.config.task_names == domains
    assert (workdir / "generator" / "training_history.json").is_file()

    # A generated adapter is a plain PEFT folder: loads with nothing missing or unexpected, holds what was generated.
    base = AutoModelForCausalLM.from_pretrained(outputs["base_model"])
    model = PeftModel.from_pretrained(base, str(workdir / "generated" / "sport"))
    result = model.load_adapter(str(workdir / "generated" / "tech"), adapter_name="tech")
    assert [key for key in result.missing_keys if ".tech." in key and "lora_" in key] == []
    assert result.unexpected_keys == []
    expected = generator.generate_adapter("tech", seed=0).state_dict
    with safe_open(workdir / "generated" / "tech" / "adapter_model.safetensors", "pt") as file:
        assert all(torch.equal(file.get_tensor(key), expected[key]) for key in expected)


def test_llm_domain_adapters_on_gemma3_then_in_context_generation(examples_on_path, tmp_path, fresh_accelerate_state):
    """The second model family (issue 17): `--quick --base-model gemma3-270m` runs the same example on a tiny random
    `Gemma3ForCausalLM`; the description generator's adapters load into Gemma with nothing missing or unexpected, and
    generate_from_descriptions then conditions a second generator on Gemma's own hidden states (Eq. 1)."""
    import generate_from_descriptions
    import llm_domain_adapters

    outputs = llm_domain_adapters.main(["--quick", "--base-model", "gemma3-270m", "--output", str(tmp_path)])
    base = AutoModelForCausalLM.from_pretrained(outputs["base_model"])
    assert type(base).__name__ == "Gemma3ForCausalLM"
    bank = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert len(bank["checkpoints"]) >= 6
    model = PeftModel.from_pretrained(base, str(tmp_path / "generated" / "sport"))
    result = model.load_adapter(str(tmp_path / "generated" / "food"), adapter_name="food")
    assert [key for key in result.missing_keys if ".food." in key and "lora_" in key] == []
    assert result.unexpected_keys == []
    generator = PeftCVAEGenerator.from_pretrained(outputs["generator"])
    expected = generator.generate_adapter("food", seed=0).state_dict
    with safe_open(tmp_path / "generated" / "food" / "adapter_model.safetensors", "pt") as file:
        assert all(torch.equal(file.get_tensor(key), expected[key]) for key in expected)

    results = generate_from_descriptions.main(["--quick", "--workdir", str(tmp_path)])
    assert set(results) == {"sport", "tech", "food"}
    in_context = PeftCVAEGenerator.from_pretrained(tmp_path / "generator-in-context")
    assert in_context.config.condition_encoder["kind"] == "hidden_state"
    assert in_context.config.condition_size == base.config.get_text_config().hidden_size


def test_generate_from_descriptions(llm_run, fresh_accelerate_state):
    import generate_from_descriptions

    workdir, _ = llm_run
    results = generate_from_descriptions.main(["--quick", "--workdir", str(workdir)])
    assert set(results) == {"sport", "tech", "food"}
    for domain, scores in results.items():
        assert set(scores) == {"base", "description", "examples"}
        assert all(torch.isfinite(torch.tensor(s["perplexity"])) and s["num_tokens"] > 0 for s in scores.values())
        for source in ("description", "examples"):
            assert (workdir / "generated-new" / f"{domain}-from-{source}" / "adapter_model.safetensors").is_file()
    # Each generator records the encoder of its conditions, so a description or examples need nothing else.
    kinds = {
        name: PeftCVAEGenerator.from_pretrained(workdir / name).config.condition_encoder["kind"]
        for name in ("generator-descriptions", "generator-in-context")
    }
    assert kinds == {"generator-descriptions": "text", "generator-in-context": "hidden_state"}


def test_diffusers_lora_generation(examples_on_path, tmp_path, fresh_accelerate_state):
    pytest.importorskip("diffusers")
    import diffusers_lora_generation

    results = diffusers_lora_generation.main(["--quick", "--output", str(tmp_path)])
    for name in ("stripes", "new"):
        result = results[name]
        assert result["files"] == [
            "README.md",  # the PEFT-style card saying which generator made it
            "adapter_config.json",
            "adapter_model.safetensors",
            INTEGRITY_NAME,  # the sha256 of each file, written last by GeneratedAdapter.save_pretrained
            "pytorch_lora_weights.safetensors",
        ]
        assert result["same_tensors"] and result["lora_alpha"] == 8 and result["change"] > 0
        with safe_open(result["folder"] / "pytorch_lora_weights.safetensors", "pt") as file:
            metadata = json.loads(file.metadata()["lora_adapter_metadata"])
        assert metadata["unet.lora_alpha"] == 8 and metadata["unet.r"] == 4


def test_hub_push_and_load(llm_run, tmp_path):
    workdir, _ = llm_run
    environment = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    environment["OMP_NUM_THREADS"] = "1"
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / "hub_push_and_load.py"), "--quick", "--workdir", str(workdir)],
        cwd=tmp_path,  # the example finds the repository root (for tests/hub_server.py) from its own path
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Local Hub server on http://127.0.0.1:" in completed.stdout
    assert "library_name=peft-cvae" in completed.stdout
    assert "gives the same logits as the local folder" in completed.stdout
    assert "LoraBank.from_pretrained reads it" in completed.stdout
