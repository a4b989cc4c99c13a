"""Generators and generated adapters on the Hub, through the real huggingface_hub / transformers / peft clients.

The Hub is `tests/hub_server.py`'s server on 127.0.0.1 (the `hub_env` fixture points every client at it); nothing is
mocked. The server lives for the whole session, so every test uses its own repo names.
"""

import copy
import json
import re

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModel, AutoModelForCausalLM

from peft_cvae import LoraLayout, PeftCVAEGenerator, train_generator
from peft_cvae.model_card import GENERATOR_TAGS, adapter_model_card
from peft_cvae.testing_utils import tiny_llama
from tests.testing_utils import TASKS, small_generator_overrides

TOKENS = torch.arange(12)[None]
MINILM = {"kind": "text", "name_or_path": "sentence-transformers/all-MiniLM-L6-v2"}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def generator_for_hub(trained_generator, base_model: str | None = None, encoder: dict | None = MINILM):
    """A copy of the session's trained generator (which must not be modified), optionally naming a Hub base model
    and a condition encoder (only recorded: the tiny bank's conditions are random vectors)."""
    generator = copy.deepcopy(trained_generator)
    generator.config.condition_encoder = dict(encoder) if encoder else None
    if base_model is not None:
        generator.config.layout["lora_config"]["base_model_name_or_path"] = base_model
    return generator


def python_blocks(markdown: str) -> list[str]:
    """The ```python code blocks of a model card."""
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def assert_same_generator(expected: PeftCVAEGenerator, actual: PeftCVAEGenerator, bank) -> None:
    assert expected.state_dict().keys() == actual.state_dict().keys()
    for name, tensor in expected.state_dict().items():
        assert torch.equal(tensor, actual.state_dict()[name]), name
    for task in TASKS:
        first = expected.generate_adapter(task, seed=3).state_dict
        second = actual.generate_adapter(task, seed=3).state_dict
        assert all(torch.equal(first[key], second[key]) for key in first), task
    params, condition = bank.vectors(), bank.checkpoint_conditions()
    with torch.no_grad():
        assert torch.equal(expected(params, condition).loss, actual(params, condition).loss)


def test_pushed_generator_loads_identically_with_from_pretrained_and_automodel(hub_env, trained_generator, bank):
    generator = generator_for_hub(trained_generator)

    commit = generator.push_to_hub("generator-round-trip")  # no namespace: the token's user

    assert commit.oid == hub_env.head("user/generator-round-trip")
    assert set(hub_env.list_files("user/generator-round-trip")) == {
        ".gitattributes",
        "README.md",
        "config.json",
        "model.safetensors",
        "peft_cvae_integrity.json",
    }
    loaded = PeftCVAEGenerator.from_pretrained("user/generator-round-trip")
    auto, info = AutoModel.from_pretrained("user/generator-round-trip", output_loading_info=True)
    assert type(auto) is PeftCVAEGenerator
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_same_generator(generator, loaded, bank)
    assert_same_generator(generator, auto, bank)
    assert loaded.config.condition_encoder == MINILM
    # No `auto_map`: transformers never imports code from a generator repo (trust_remote_code is not supported).
    assert "auto_map" not in json.loads(hub_env.read_file("user/generator-round-trip", "config.json"))
    assert loaded.generate_adapter("ascending", seed=0).generator_name_or_path == "user/generator-round-trip"
    # Sanity check that the comparison can fail: another seed gives another adapter.
    other = loaded.generate_adapter("ascending", seed=1).state_dict
    same = loaded.generate_adapter("ascending", seed=0).state_dict
    assert not all(torch.equal(other[key], same[key]) for key in other)


def test_the_generator_card_on_the_hub_is_ours(hub_env, trained_generator):
    generator = generator_for_hub(trained_generator, base_model="user/tiny-llama")
    generator.push_to_hub("user/generator-card", tags=["bbc-news"])

    card = ModelCard.load("user/generator-card")

    assert card.data.library_name == "peft-cvae"
    assert card.data.base_model == "user/tiny-llama"
    assert card.data.tags == [*GENERATOR_TAGS, "bbc-news"]
    assert "Provide a quick summary" not in card.text  # transformers' generic template did not win
    for task in TASKS:
        assert f"| `{task}` | token sequences that follow the {task} pattern |" in card.text
    assert "| target modules | `q_proj`, `v_proj` |" in card.text
    assert "| rank `r` | 2 |" in card.text and "| `lora_alpha` | 4 |" in card.text
    assert "- **name_or_path**: `sentence-transformers/all-MiniLM-L6-v2`" in card.text
    history = trained_generator.training_history
    assert f"| epochs | {len(history)} |" in card.text
    assert f"| final reconstruction loss | {history[-1]['reconstruction_loss']:.6g} |" in card.text
    assert 'PeftCVAEGenerator.from_pretrained("user/generator-card")' in card.text
    assert 'AutoModelForCausalLM.from_pretrained("user/tiny-llama")' in card.text

    # The training figures travel in config.json too, so a re-pushed generator keeps them.
    config = json.loads(hub_env.read_file("user/generator-card", "config.json"))
    assert config["training_summary"]["epochs"] == len(history)
    assert "training_summary" not in trained_generator.config.to_dict()  # saving left the generator unchanged
    reloaded = PeftCVAEGenerator.from_pretrained("user/generator-card")
    reloaded.push_to_hub("user/generator-card-again")
    assert f"| epochs | {len(history)} |" in ModelCard.load("user/generator-card-again").text


def test_save_pretrained_writes_the_card_and_push_to_hub_true_uploads_it(hub_env, trained_generator, tmp_path):
    generator = generator_for_hub(trained_generator)
    folder = tmp_path / "generator-saved"

    generator.save_pretrained(folder, push_to_hub=True, repo_id="user/generator-saved")

    assert sorted(path.name for path in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "peft_cvae_integrity.json",
    ]
    local_card = ModelCard.load(folder / "README.md")
    assert local_card.data.library_name == "peft-cvae"
    assert f'PeftCVAEGenerator.from_pretrained("{folder}")' in local_card.text
    hub_card = ModelCard.load("user/generator-saved")
    assert hub_card.data.library_name == "peft-cvae" and hub_card.data.tags == GENERATOR_TAGS
    assert 'from_pretrained("user/generator-saved")' in hub_card.text
    assert hf_hub_download("user/generator-saved", "model.safetensors")
    assert PeftCVAEGenerator.from_pretrained(folder).config.to_dict() == (
        PeftCVAEGenerator.from_pretrained("user/generator-saved").config.to_dict() | {"_name_or_path": str(folder)}
    )


def test_push_to_a_branch_leaves_main_alone(hub_env, trained_generator, bank):
    HfApi().create_repo("user/generator-branch")
    generator = generator_for_hub(trained_generator)

    generator.push_to_hub("user/generator-branch", revision="v1", commit_message="First version")

    assert hub_env.list_files("user/generator-branch") == [".gitattributes"]
    assert "README.md" in hub_env.list_files("user/generator-branch", revision="v1")
    assert_same_generator(generator, PeftCVAEGenerator.from_pretrained("user/generator-branch", revision="v1"), bank)
    assert HfApi().list_repo_commits("user/generator-branch", revision="v1")[0].title == "First version"


def test_adapter_card_of_a_diffusers_unet_lora_shows_load_lora_weights(trained_generator):
    adapter = trained_generator.generate_adapter("repeating", seed=None, temperature=0.0)
    adapter.layout = LoraLayout.from_dict({**adapter.layout.to_dict(), "library": "diffusers"})

    card = adapter_model_card(adapter, model_id="user/unet-lora")

    assert card.data.library_name == "peft" and card.data.pipeline_tag is None
    assert {"lora", "peft-cvae", "diffusers"} <= set(card.data.tags) and "transformers" not in card.data.tags
    assert 'pipe.load_lora_weights("user/unet-lora")' in card.text
    assert "An unsaved peft-cvae generator generated it for the task `repeating` (no seed, temperature 0.0)." in (
        card.text
    )


def test_pushed_adapter_loads_with_plain_peft_like_the_local_folder(hub_env, trained_generator, tmp_path, monkeypatch):
    tiny_llama(seed=0).push_to_hub("user/tiny-llama-base")  # the base model, on the Hub as well
    generator_for_hub(trained_generator, "user/tiny-llama-base", encoder=None).push_to_hub("user/adapter-generator")
    generator = PeftCVAEGenerator.from_pretrained("user/adapter-generator")
    adapter = generator.generate_adapter("descending", seed=0)

    adapter.push_to_hub("user/generated-descending")
    adapter.save_pretrained(tmp_path / "local")

    assert set(hub_env.list_files("user/generated-descending")) == {
        ".gitattributes",
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "peft_cvae_integrity.json",
    }
    from_hub = PeftModel.from_pretrained(tiny_llama(seed=0), "user/generated-descending").eval()
    from_folder = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "local").eval()
    assert torch.equal(logits(from_hub), logits(from_folder))
    assert not torch.equal(logits(from_hub), logits(tiny_llama(seed=0)))  # the adapter does something
    # Someone who never heard of peft-cvae: the adapter repo names its base model, also on the Hub.
    auto = AutoPeftModelForCausalLM.from_pretrained("user/generated-descending").eval()
    assert torch.equal(logits(auto), logits(from_folder))

    result = from_folder.load_adapter("user/generated-descending", adapter_name="hub")
    assert result.missing_keys == [] and result.unexpected_keys == []
    state = from_folder.state_dict()
    for key, tensor in adapter.state_dict.items():
        module_key = key.replace(".weight", ".hub.weight")
        assert torch.equal(state[module_key], tensor), key

    card = ModelCard.load("user/generated-descending")
    assert card.data.library_name == "peft"
    assert card.data.base_model == "user/tiny-llama-base"
    assert card.data.pipeline_tag == "text-generation"
    assert {"base_model:adapter:user/tiny-llama-base", "lora", "peft-cvae"} <= set(card.data.tags)
    assert (
        "The peft-cvae generator `user/adapter-generator` generated it for the task `descending` "
        "(seed 0, temperature 1.0)."
    ) in card.text
    assert 'PeftModel.from_pretrained(base, "user/generated-descending")' in card.text

    # The usage snippets of both cards run as written.
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for repo_id in ("user/adapter-generator", "user/generated-descending"):
        for block in python_blocks(ModelCard.load(repo_id).text):
            exec(compile(block, f"{repo_id}/README.md", "exec"), namespace)
    assert (tmp_path / "generated-lora" / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained("user/tiny-llama-base")
    expected = generator.generate_adapter("ascending", seed=0, base_model=base).eval()
    assert torch.equal(logits(namespace["peft_model"].eval()), logits(expected))  # generator card: first task
    assert torch.equal(logits(namespace["model"].eval()), logits(from_folder))  # adapter card


def test_adapter_card_says_what_the_adapter_was_generated_for(trained_generator):
    fused = trained_generator.generate_adapter(["ascending", "descending"], weights=[3, 1], seed=0)
    from_vector = trained_generator.generate_adapter(torch.ones(8), seed=2)

    assert (
        "generated it for a fusion of the tasks `ascending`, `descending` (weights 0.75, 0.25, combined by "
        "condition) (seed 0, temperature 1.0)."
    ) in adapter_model_card(fused).text
    assert "generated it for a task given as a condition vector (seed 2, temperature 1.0)." in (
        adapter_model_card(from_vector).text
    )


def test_missing_generator_repo_or_weights_file_is_a_clear_error(hub_env, trained_generator, tmp_path, monkeypatch):
    """transformers turns huggingface_hub's RepositoryNotFoundError / EntryNotFoundError into an OSError that names
    the repo and the missing file; peft-cvae passes it on unchanged."""
    # Without weights, transformers would first ask the Hub's safetensors-converter bot (via discussions, which the
    # local server does not serve); transformers switches that off the same way in its own CI.
    monkeypatch.setenv("DISABLE_SAFETENSORS_CONVERSION", "1")
    with pytest.raises(OSError, match="user/no-such-generator"):
        PeftCVAEGenerator.from_pretrained("user/no-such-generator")

    trained_generator.config.save_pretrained(tmp_path / "config-only")
    HfApi().create_repo("user/config-only")
    HfApi().upload_folder(folder_path=tmp_path / "config-only", repo_id="user/config-only")
    with pytest.raises(OSError, match="model.safetensors"):
        PeftCVAEGenerator.from_pretrained("user/config-only")


def test_train_generator_records_its_history_for_the_card(bank, tmp_path):
    generator = PeftCVAEGenerator.from_bank(bank, **small_generator_overrides())
    history = train_generator(generator, bank, epochs=3, batch_size=4, show_progress=False, output_dir=tmp_path)

    assert generator.training_history == history
    card = ModelCard.load(tmp_path / "README.md")
    assert "| epochs | 3 |" in card.text
    assert f"| final reconstruction loss | {history[-1]['reconstruction_loss']:.6g} |" in card.text
