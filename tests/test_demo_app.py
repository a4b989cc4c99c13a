"""The interactive demo (peft_cvae.demo_app, spaces/app.py): the backend without gradio, then the launched page driven
through `gradio_client` (skipped when gradio is not installed), then the Space's entry point."""

import copy
import runpy
import socket
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_cvae import (
    ConditionError,
    HiddenStateTaskEncoder,
    LoraBank,
    PeftCVAEGenerator,
    TextTaskEncoder,
    UnknownTaskError,
    train_generator,
)
from peft_cvae.constants import INTEGRITY_NAME
from peft_cvae.demo_app import MODE_DESCRIPTION, MODE_EXAMPLES, MODE_TASK, AdapterDemo
from peft_cvae.errors import DemoError
from peft_cvae.testing_utils import save_tiny_text_encoder, tiny_llama
from tests.hub_fixtures import DUMMY_TOKEN
from tests.testing_utils import TASKS, small_generator_overrides

SPACE_APP = Path(__file__).resolve().parents[1] / "spaces" / "app.py"
DESCRIPTIONS = {task: f"token sequences that follow the {task} pattern" for task in TASKS}
EXAMPLES = {
    "ascending": ["numbers count up", "up up up again"],
    "descending": ["numbers count down", "down down down again"],
    "repeating": ["repeating pattern again", "the a the a the a"],
}


def _copy_bank(bank) -> LoraBank:
    """The session bank's checkpoints in a new bank (the session bank must not be modified)."""
    copy = LoraBank(bank.layout)
    for checkpoint in bank.checkpoints:
        copy.add_checkpoint(checkpoint.task, checkpoint.state_dict, step=checkpoint.step)
    return copy


def _train(bank) -> PeftCVAEGenerator:
    generator = PeftCVAEGenerator.from_bank(bank, **small_generator_overrides())
    history = train_generator(generator, bank, epochs=60, lr=3e-3, batch_size=4, show_progress=False)
    assert history[-1]["loss"] < history[0]["loss"]
    return generator.eval()


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A saved tiny Llama with a WordPiece tokenizer over tests.testing_utils.TINY_WORDS: a loadable base model."""
    folder = tmp_path_factory.mktemp("tiny-base")
    tokenizer = AutoTokenizer.from_pretrained(save_tiny_text_encoder(tmp_path_factory.mktemp("words")))
    tiny_llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_encoder_dir(tmp_path_factory) -> str:
    return save_tiny_text_encoder(tmp_path_factory.mktemp("text-encoder"))


@pytest.fixture(scope="module")
def text_generator(bank, text_encoder_dir):
    """A generator whose conditions are description embeddings (a recorded `TextTaskEncoder`)."""
    copy = _copy_bank(bank)
    copy.encode_conditions(TextTaskEncoder(text_encoder_dir), DESCRIPTIONS)
    return _train(copy)


@pytest.fixture(scope="module")
def hidden_generator(bank, tiny_base):
    """A generator whose conditions are the base model's hidden states on example texts (ICM-LoRA Eq. 1)."""
    copy = _copy_bank(bank)
    encoder = HiddenStateTaskEncoder(
        AutoModelForCausalLM.from_pretrained(tiny_base),
        AutoTokenizer.from_pretrained(tiny_base),
        name_or_path=str(tiny_base),
    )
    copy.encode_conditions(encoder, EXAMPLES)
    return _train(copy)


def _base_and_tokenizer(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """An independent greedy continuation, to check the demo's."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    output = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)


def _assert_loads_exactly(folder: Path, adapter) -> PeftModel:
    """The folder loads into PEFT with no missing or unexpected key and holds exactly `adapter`'s tensors."""
    from safetensors.torch import load_file

    model = PeftModel.from_pretrained(tiny_llama(), folder, adapter_name="first")
    result = model.load_adapter(folder, adapter_name="check")
    assert result.missing_keys == [] and result.unexpected_keys == []
    saved = load_file(folder / "adapter_model.safetensors")
    assert sorted(saved) == sorted(adapter.state_dict)
    assert all(torch.equal(saved[key], adapter.state_dict[key]) for key in saved)
    model.set_adapter("first")
    return model.eval()


# ---- the backend, no gradio needed ----------------------------------------------------------------------------------
def test_modes_follow_the_recorded_encoder(trained_generator, text_generator, hidden_generator, tiny_base):
    assert AdapterDemo(trained_generator).modes == [MODE_TASK]  # plain tensors: training tasks only
    assert AdapterDemo(text_generator).modes == [MODE_TASK, MODE_DESCRIPTION]
    assert AdapterDemo(hidden_generator, *_base_and_tokenizer(tiny_base)).modes == [MODE_TASK, MODE_EXAMPLES]
    with pytest.raises(ConditionError, match="Training task"):
        AdapterDemo(trained_generator).generate(MODE_DESCRIPTION, text="numbers count up")


def test_generate_matches_the_generator_and_ranks_tasks_by_cosine(text_generator, text_encoder_dir):
    demo = AdapterDemo(text_generator)
    adapter, rows = demo.generate(MODE_TASK, "descending", seed=5, temperature=0.7)
    expected = text_generator.generate_adapter("descending", seed=5, temperature=0.7)
    assert all(torch.equal(adapter.state_dict[key], expected.state_dict[key]) for key in expected.state_dict)
    assert rows[0][0] == "descending" and rows[0][1] == pytest.approx(1.0, abs=1e-4)
    assert [row[1] for row in rows] == sorted((row[1] for row in rows), reverse=True)

    description = "numbers count up again"
    adapter, rows = demo.generate(MODE_DESCRIPTION, text=f"  {description}\n", seed=2, temperature=0.5)
    expected = text_generator.generate_adapter(description, seed=2, temperature=0.5)
    assert all(torch.equal(adapter.state_dict[key], expected.state_dict[key]) for key in expected.state_dict)
    assert adapter.metadata["description"] == description
    # The similarities, computed independently from the encoder and the descriptions the bank was encoded with.
    encoder = TextTaskEncoder(text_encoder_dir)
    condition = encoder.encode(description)
    for task, cosine, shown_description in rows:
        assert shown_description == DESCRIPTIONS[task]
        assert cosine == pytest.approx(
            F.cosine_similarity(condition, encoder.encode(DESCRIPTIONS[task]), dim=0).item(), abs=1e-4
        )
    assert "numbers count up again" in demo.summary(adapter, rows)


def test_examples_use_the_demo_base_model(hidden_generator, tiny_base):
    base, tokenizer = _base_and_tokenizer(tiny_base)
    demo = AdapterDemo(hidden_generator, base, tokenizer)
    adapter, rows = demo.generate(MODE_EXAMPLES, text="numbers count up\n\n  up up up again \n", seed=1)
    encoder = HiddenStateTaskEncoder(base, tokenizer, name_or_path=str(tiny_base))
    expected = hidden_generator.generate_adapter(
        examples=["numbers count up", "up up up again"], seed=1, task_encoder=encoder
    )
    assert all(torch.equal(adapter.state_dict[key], expected.state_dict[key]) for key in expected.state_dict)
    assert adapter.metadata["examples"] == 2
    assert rows[0][0] == "ascending" and rows[0][1] == pytest.approx(
        1.0, abs=1e-4
    )  # the ascending task's own examples


def test_compare_runs_base_and_adapted_and_leaves_the_base_as_it_was(text_generator, tiny_base, tmp_path):
    base, tokenizer = _base_and_tokenizer(tiny_base)
    before = {key: value.clone() for key, value in base.state_dict().items()}
    demo = AdapterDemo(text_generator, base, tokenizer)
    adapter, _ = demo.generate(MODE_TASK, "ascending", seed=0)
    base_text, adapted_text = demo.compare(adapter, "numbers count up", max_new_tokens=8)

    reference_base, _ = _base_and_tokenizer(tiny_base)
    assert base_text == _greedy(reference_base, tokenizer, "numbers count up", 8)
    adapter.save_pretrained(tmp_path / "adapter")
    reference_adapted = _assert_loads_exactly(tmp_path / "adapter", adapter)
    assert adapted_text == _greedy(reference_adapted, tokenizer, "numbers count up", 8)
    assert base_text != adapted_text  # the trained LoRA changes this random model's greedy continuation
    # The LoRA layers were taken out again: the shared base model is the plain model, with the same weights.
    assert base.state_dict().keys() == before.keys()
    assert all(torch.equal(base.state_dict()[key], before[key]) for key in before)
    assert not any("lora" in name for name, _ in base.named_modules())


def test_zip_holds_one_adapter_folder(text_generator, tmp_path):
    demo = AdapterDemo(text_generator)
    adapter, _ = demo.generate(MODE_TASK, "repeating", seed=4)
    archive = demo.zip_adapter(adapter)
    assert archive.name == "peft-cvae-repeating-seed4.zip"
    with zipfile.ZipFile(archive) as opened:
        assert sorted(opened.namelist()) == [
            "peft-cvae-repeating-seed4/",
            "peft-cvae-repeating-seed4/README.md",  # the adapter's card, with where it came from
            "peft-cvae-repeating-seed4/adapter_config.json",
            "peft-cvae-repeating-seed4/adapter_model.safetensors",
            f"peft-cvae-repeating-seed4/{INTEGRITY_NAME}",
        ]
        opened.extractall(tmp_path)
    _assert_loads_exactly(tmp_path / "peft-cvae-repeating-seed4", adapter)


def test_bad_requests_are_clear_errors(text_generator, hidden_generator, tiny_base):
    demo = AdapterDemo(text_generator, allow_environment_token=False)
    with pytest.raises(UnknownTaskError, match="'ascending'"):
        demo.generate(MODE_TASK, "no-such-task")
    with pytest.raises(ConditionError, match="description is empty"):
        demo.generate(MODE_DESCRIPTION, text="  \n ")
    with pytest.raises(ConditionError, match="one per line"):
        AdapterDemo(hidden_generator, *_base_and_tokenizer(tiny_base)).generate(MODE_EXAMPLES, text="\n\n")
    adapter, _ = demo.generate(MODE_TASK, "ascending")
    with pytest.raises(DemoError, match="No base model"):
        demo.compare(adapter, "numbers")
    with pytest.raises(DemoError, match="repo id"):
        demo.push(adapter, "  ")
    with pytest.raises(DemoError, match="token"):  # a public Space must not push with its owner's token
        demo.push(adapter, "user/x", token="")
    with pytest.raises(DemoError, match="tokenizer"):
        AdapterDemo(text_generator, tiny_llama())
    with pytest.raises(DemoError, match="PeftModel"):
        AdapterDemo(text_generator, adapter.to_peft_model(tiny_llama()), object())


def test_an_unloadable_recorded_base_model_says_how_to_name_another(text_generator, tiny_base):
    from peft_cvae.demo_app import load_demo

    moved = copy.deepcopy(text_generator)  # LoRAs trained on a base model at a path of another machine
    moved.config.layout["lora_config"]["base_model_name_or_path"] = "/path/of/another/machine/base"
    with pytest.raises(DemoError, match="PEFT_CVAE_BASE_MODEL"):
        load_demo(moved)
    generator, base, tokenizer = load_demo(moved, str(tiny_base))
    assert generator is moved and AdapterDemo(generator, base, tokenizer).can_compare
    assert load_demo(moved, load_base_model=False) == (moved, None, None)


# ---- the launched page, through gradio_client -----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def gradio_env(monkeypatch, tmp_path):
    pytest.importorskip("gradio")
    pytest.importorskip("gradio_client")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from the tests
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # gradio's copies of the zips, not in /tmp/gradio


def test_launched_demo_through_gradio_client(gradio_env, hub_env, text_generator, tiny_base, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from peft_cvae.demo_app import launch_demo

    base, tokenizer = _base_and_tokenizer(tiny_base)
    demo = launch_demo(text_generator, base, tokenizer, server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False, download_files=str(tmp_path / "downloads"))
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert set(endpoints) == {"/generate", "/compare", "/push"}

        summary, table, archive = client.predict(MODE_TASK, "ascending", "", 3, 0.5, api_name="/generate")
        expected = text_generator.generate_adapter("ascending", seed=3, temperature=0.5)
        assert "training task **ascending**" in summary and "seed 3" in summary
        assert table["headers"] == ["training task", "cosine", "description"]
        assert table["data"][0][:2] == ["ascending", pytest.approx(1.0, abs=1e-4)]
        with zipfile.ZipFile(archive) as opened:
            opened.extractall(tmp_path / "unzipped")
        adapted = _assert_loads_exactly(tmp_path / "unzipped" / "peft-cvae-ascending-seed3", expected)

        base_text, adapted_text = client.predict("numbers count up", 6, api_name="/compare")
        assert base_text == _greedy(_base_and_tokenizer(tiny_base)[0], tokenizer, "numbers count up", 6)
        assert adapted_text == _greedy(adapted, tokenizer, "numbers count up", 6)

        summary, table, archive = client.predict(
            MODE_DESCRIPTION, None, "numbers count down", 7, 1.0, api_name="/generate"
        )
        assert "*numbers count down*" in summary and Path(archive).name == "peft-cvae-numbers-count-down-seed7.zip"
        assert {row[0] for row in table["data"]} == set(TASKS)

        with pytest.raises(AppError, match="description is empty"):  # the message the page shows, no traceback
            client.predict(MODE_DESCRIPTION, None, "   ", 7, 1.0, api_name="/generate")

        # Push the last generated adapter (the description one) to the local Hub, then load it with plain PEFT.
        status = client.predict("user/demo-pushed", DUMMY_TOKEN, False, api_name="/push")
        assert status.startswith("Pushed to") and "user/demo-pushed" in status
        pushed = PeftModel.from_pretrained(tiny_llama(), "user/demo-pushed")
        expected = text_generator.generate_adapter("numbers count down", seed=7, temperature=1.0)
        assert all(
            torch.equal(pushed.state_dict()[key.replace(".weight", ".default.weight")], tensor)
            for key, tensor in expected.state_dict.items()
        )
        status = client.predict("not a valid repo id!", DUMMY_TOKEN, False, api_name="/push")
        assert status.startswith("Push failed:") and "Traceback" not in status
    finally:
        demo.close()


# ---- the Hugging Face Space entry point -----------------------------------------------------------------------------
def test_space_app_builds_from_a_folder_and_from_the_hub(
    gradio_env, hub_env, hidden_generator, tiny_base, tmp_path, monkeypatch
):
    hidden_generator.save_pretrained(tmp_path / "generator")
    monkeypatch.setenv("PEFT_CVAE_BASE_MODEL", str(tiny_base))
    for source in (str(tmp_path / "generator"), "user/demo-generator"):
        if source == "user/demo-generator":
            hidden_generator.push_to_hub(source)
        monkeypatch.setenv("PEFT_CVAE_GENERATOR", source)
        page = runpy.run_path(str(SPACE_APP))["demo"]  # built, not launched (run_path's __name__ is not __main__)
        backend = page.adapter_demo
        assert backend.modes == [MODE_TASK, MODE_EXAMPLES] and backend.can_compare
        assert not backend.allow_environment_token  # visitors push with their own token only
        adapter, rows = backend.generate(MODE_EXAMPLES, text="numbers count down\ndown down down again", seed=0)
        expected = hidden_generator.generate_adapter(
            examples=["numbers count down", "down down down again"],
            seed=0,
            task_encoder=HiddenStateTaskEncoder(*_base_and_tokenizer(tiny_base), name_or_path=str(tiny_base)),
        )
        assert all(torch.equal(adapter.state_dict[key], expected.state_dict[key]) for key in expected.state_dict)
        assert rows[0][0] == "descending"

    monkeypatch.delenv("PEFT_CVAE_GENERATOR")
    with pytest.raises(DemoError, match="PEFT_CVAE_GENERATOR"):
        runpy.run_path(str(SPACE_APP))


def test_demo_command_help_and_missing_generator(tmp_path, capsys):
    """`peft-cvae demo` is wired into the CLI: its help names its options, and a generator that is not there is one
    line on stderr with exit status 2 (before gradio or any model is loaded)."""
    from peft_cvae.commands import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert all(option in help_text for option in ("--base-model", "--no-compare", "--host", "--port", "--share"))

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", str(tmp_path / "no-such-generator")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("peft-cvae demo: error:") and len(error.splitlines()) == 1
