"""Regression tests of issue 15 (an adversarial run against c9feab9): each fails on that commit.

Items covered here: 2 (racing saves and loads), 3 (lora_bias adapters, banks mixing fp32 and fp16), 4 (from_bank +
train_generator reproduce bit for bit), 5 (an edited config.json cannot allocate or loop), 6 (every file that changes
the output is covered by the integrity record), 9 (a bad argument is blamed, not the weights), 10 (generate_adapter's
argument checks; adapters differing only in lora_dropout, init_lora_weights or task_type share a layout).
"""

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from peft.utils import get_peft_model_state_dict

from peft_cvae import (
    ConditionError,
    CorruptFileError,
    GeneratedAdapter,
    InvalidArgumentError,
    LoraBank,
    LoraLayout,
    MissingFileError,
    NonFiniteError,
    NotWritableError,
    PeftCVAEError,
    PeftCVAEGenerator,
    train_generator,
)
from peft_cvae.adapter_io import load_adapter
from peft_cvae.constants import DIFFUSERS_WEIGHTS_NAME, INTEGRITY_NAME
from tests.testing_utils import TASKS, small_generator_overrides, tiny_llama, tiny_lora_config

LEGACY = Path(__file__).parent / "fixtures" / "legacy_c9feab9"


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


# ---- item 4: seeds reproduce training ---------------------------------------------------------------------------
def test_from_bank_and_train_generator_with_one_seed_are_bit_identical(bank):
    torch.manual_seed(123)
    runs = []
    for _ in range(2):
        torch.rand(7)  # a different global random state for each run
        generator = PeftCVAEGenerator.from_bank(bank, **small_generator_overrides())
        train_generator(generator, bank, epochs=3, batch_size=4, seed=0, show_progress=False)
        runs.append(generator.state_dict())
    assert all(torch.equal(runs[0][name], runs[1][name]) for name in runs[0])
    other = PeftCVAEGenerator.from_bank(bank, seed=1, **small_generator_overrides()).state_dict()
    assert not torch.equal(
        other["encoder.position_embedding"],
        PeftCVAEGenerator.from_bank(bank, **small_generator_overrides()).state_dict()["encoder.position_embedding"],
    )


def test_from_bank_leaves_the_global_random_state_alone(bank):
    state = torch.random.get_rng_state()
    PeftCVAEGenerator.from_bank(bank, **small_generator_overrides())
    assert torch.equal(torch.random.get_rng_state(), state)


# ---- item 6: the integrity record covers configs, manifests and every file ----------------------------------------
def test_flipping_lora_alpha_in_a_generator_config_is_detected(trained_generator, tmp_path):
    trained_generator.save_pretrained(tmp_path / "generator")
    edit_json(tmp_path / "generator" / "config.json", lambda data: data["layout"]["lora_config"].update(lora_alpha=5))
    with pytest.raises(CorruptFileError, match=r"config\.json.*sha256"):
        PeftCVAEGenerator.from_pretrained(tmp_path / "generator")


def test_editing_bank_json_is_detected(bank, tmp_path):
    bank.save_pretrained(tmp_path / "bank")
    edit_json(tmp_path / "bank" / "bank.json", lambda data: data["tasks"][0].update(description="something else"))
    with pytest.raises(CorruptFileError, match=r"bank\.json.*sha256"):
        LoraBank.from_pretrained(tmp_path / "bank")


def test_deleting_the_conditions_of_a_bank_is_a_clear_error_at_load(bank, tmp_path):
    bank.save_pretrained(tmp_path / "bank")
    (tmp_path / "bank" / "conditions.safetensors").unlink()
    with pytest.raises(MissingFileError, match="conditions.safetensors"):
        LoraBank.from_pretrained(tmp_path / "bank")
    shutil.copytree(LEGACY / "bank", tmp_path / "legacy")  # saved by c9feab9: its manifest records the hash
    (tmp_path / "legacy" / "conditions.safetensors").unlink()
    with pytest.raises(MissingFileError, match="conditions.safetensors"):
        LoraBank.from_pretrained(tmp_path / "legacy")


def test_an_edited_adapter_config_is_detected(trained_generator, tmp_path):
    trained_generator.generate_adapter("ascending", seed=0).save_pretrained(tmp_path / "adapter")
    edit_json(tmp_path / "adapter" / "adapter_config.json", lambda data: data.update(lora_alpha=5))
    with pytest.raises(CorruptFileError, match="sha256"):
        LoraLayout.from_pretrained(tmp_path / "adapter")


def test_integrity_record_lists_every_saved_file_but_the_card(trained_generator, bank, tmp_path):
    trained_generator.save_pretrained(tmp_path / "generator")
    bank.save_pretrained(tmp_path / "bank")
    generator_record = json.loads((tmp_path / "generator" / INTEGRITY_NAME).read_text())["files"]
    bank_record = json.loads((tmp_path / "bank" / INTEGRITY_NAME).read_text())["files"]
    assert sorted(generator_record) == ["config.json", "model.safetensors"]
    assert {"bank.json", "conditions.safetensors", "checkpoints/00000.safetensors"} <= set(bank_record)
    assert len(bank_record) == 2 + len(bank)


# ---- item 5: an edited config.json is refused before anything is built ------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("patch_size", 10**9),
        ("latent_size", 10**9),
        ("condition_size", 10**9),
        ("hidden_channels", 10**5),
        ("num_layers", 10**6),
        ("kernel_size", 10**5 + 1),
    ],
)
def test_a_config_with_huge_sizes_is_refused_at_once(trained_generator, tmp_path, field, value):
    folder = tmp_path / "generator"
    trained_generator.save_pretrained(folder)
    edit_json(folder / "config.json", lambda data: data.update({field: value}))
    (folder / INTEGRITY_NAME).unlink()  # as in a folder saved before the record: the sizes themselves are checked
    started = time.monotonic()
    with pytest.raises(CorruptFileError, match=field):
        PeftCVAEGenerator.from_pretrained(folder)
    assert time.monotonic() - started < 10


# ---- item 2: racing saves and loads ----------------------------------------------------------------------------
def test_racing_saves_never_mix_two_adapters_and_loads_see_one_whole_version(trained_generator, tmp_path):
    first = trained_generator.generate_adapter("ascending", seed=0)
    second = trained_generator.generate_adapter("descending", seed=1)
    config = dict(second.layout.lora_config, lora_alpha=second.layout.lora_config["lora_alpha"] * 2)
    second = GeneratedAdapter(second.state_dict, LoraLayout(**{**second.layout.to_dict(), "lora_config": config}))
    versions = {adapter.layout.lora_config["lora_alpha"]: adapter.state_dict for adapter in (first, second)}
    folder = tmp_path / "adapter"
    first.save_pretrained(folder)
    problems, stop = [], threading.Event()

    def write(adapter):
        while not stop.is_set():
            adapter.save_pretrained(folder)

    def read():
        for _ in range(40):
            try:
                lora_config, state_dict = load_adapter(folder)
            except PeftCVAEError as error:  # a save in progress must not show as a corrupt folder
                problems.append(error)
                continue
            expected = versions[lora_config["lora_alpha"]]
            if not all(torch.equal(state_dict[key], expected[key]) for key in expected):
                problems.append("the config of one save came with the weights of the other")

    writers = [threading.Thread(target=write, args=(adapter,)) for adapter in (first, second)]
    for thread in writers:
        thread.start()
    try:
        read()
    finally:
        stop.set()
        for thread in writers:
            thread.join()
    assert problems == []
    lora_config, state_dict = load_adapter(folder)
    assert all(torch.equal(state_dict[key], tensor) for key, tensor in versions[lora_config["lora_alpha"]].items())


# ---- item 3: lora_bias adapters and mixed dtypes ----------------------------------------------------------------
def test_lora_bias_adapters_make_a_bank_that_saves_loads_and_trains(tmp_path):
    model = get_peft_model(tiny_llama(), tiny_lora_config(lora_bias=True))
    state = {key: value.detach().clone() for key, value in get_peft_model_state_dict(model).items()}
    assert any(key.endswith("lora_B.bias") for key in state)
    bank = LoraBank(LoraLayout.from_state_dict(state, model.peft_config["default"]))
    for index, task in enumerate(TASKS[:2]):
        for step in range(2):
            bank.add_checkpoint(task, {key: value + 0.01 * (index + step) for key, value in state.items()}, step)
        bank.set_condition(task, torch.randn(4))
    bank.save_pretrained(tmp_path / "bank")
    loaded = LoraBank.from_pretrained(tmp_path / "bank")
    assert torch.equal(loaded.vectors(), bank.vectors())
    generator = PeftCVAEGenerator.from_bank(loaded, **small_generator_overrides())
    adapter = generator.generate_adapter(TASKS[0], temperature=0)
    result = adapter.to_peft_model(tiny_llama())
    assert result.peft_config["default"].lora_bias


def test_a_bank_mixing_fp32_and_fp16_checkpoints_saves_and_loads(bank, tmp_path):
    half = LoraBank(LoraLayout(**{**bank.layout.to_dict(), "dtype": "float16"}))
    for index, checkpoint in enumerate(bank):
        state = checkpoint.state_dict if index % 2 else {key: t.half() for key, t in checkpoint.state_dict.items()}
        half.add_checkpoint(checkpoint.task, state, checkpoint.step)
    for task in bank.task_names:
        half.set_condition(task, bank.condition(task))
    assert {tensor.dtype for checkpoint in half for tensor in checkpoint.state_dict.values()} == {torch.float16}
    half.save_pretrained(tmp_path / "bank")
    loaded = LoraBank.from_pretrained(tmp_path / "bank")
    assert torch.equal(loaded.vectors(), half.vectors())
    PeftCVAEGenerator.from_bank(loaded, **small_generator_overrides())


def test_a_checkpoint_beyond_the_range_of_the_bank_dtype_is_refused_when_added(bank):
    half = LoraBank(LoraLayout(**{**bank.layout.to_dict(), "dtype": "float16"}))
    state = {key: tensor * 1e6 for key, tensor in bank.checkpoints[0].state_dict.items()}
    with pytest.raises(NonFiniteError):
        half.add_checkpoint("ascending", state)
    assert len(half) == 0


# ---- items 9 and 10: generate_adapter's arguments -----------------------------------------------------------------
@pytest.mark.parametrize(
    "arguments",
    [
        {"num_samples": 0},
        {"num_samples": -1},
        {"num_samples": 2.0},
        {"num_samples": True},
        {"temperature": -0.5},
        {"temperature": "1"},
        {"temperature": None},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"seed": "3"},
        {"seed": 2**64},
        {"seed": -1},
        {"adapter_name": ""},
        {"adapter_name": "  "},
    ],
    ids=repr,
)
def test_bad_generation_arguments_are_named(trained_generator, arguments):
    with pytest.raises(InvalidArgumentError) as error:
        trained_generator.generate_adapter("ascending", **arguments)
    assert list(arguments)[0] in str(error.value)
    assert isinstance(error.value, (ValueError, TypeError))


@pytest.mark.parametrize(
    "task, weights",
    [
        (["ascending", "descending"], "1,1"),
        (["ascending", "descending"], {"ascending": 1}),
        (["ascending", "descending"], ["a", "b"]),
        ("", None),
        ("   ", None),
        ("\ud800", None),
        (torch.zeros(8, dtype=torch.complex64), None),
        (torch.full((8,), float("nan")), None),
    ],
    ids=repr,
)
def test_bad_tasks_and_weights_are_condition_errors(trained_generator, task, weights):
    with pytest.raises(ConditionError):
        trained_generator.generate_adapter(task, weights=weights)


def test_a_huge_temperature_is_blamed_not_the_weights(trained_generator):
    with pytest.raises(NonFiniteError) as error:
        trained_generator.generate_adapter("ascending", seed=0, temperature=1e38)
    assert "temperature" in str(error.value) and "retrain" not in str(error.value)


def test_huge_conditions_are_blamed_not_the_weights(trained_generator):
    try:
        adapter = trained_generator.generate_adapter(torch.full((8,), 3e38), temperature=0)
    except NonFiniteError as error:
        assert "condition" in str(error) and "retrain" not in str(error)
    else:
        assert all(torch.isfinite(tensor).all() for tensor in adapter.state_dict.values())


def test_adapters_differing_only_in_training_settings_share_a_layout(bank):
    checkpoint = bank.checkpoints[0].state_dict
    layout = LoraLayout.from_state_dict(checkpoint, tiny_lora_config())
    for change in ({"lora_dropout": 0.1}, {"init_lora_weights": "gaussian"}, {"task_type": "SEQ_CLS"}):
        layout.check_config(tiny_lora_config(**change))
    with pytest.raises(PeftCVAEError, match="lora_alpha"):
        layout.check_config(tiny_lora_config(lora_alpha=8))


def test_the_diffusers_file_name_is_diffusers_own():
    diffusers = pytest.importorskip("diffusers.loaders.lora_base")
    assert DIFFUSERS_WEIGHTS_NAME == diffusers.LORA_WEIGHT_NAME_SAFE


# ---- item 10: a full disk and a file given as a generator ---------------------------------------------------------
def test_a_full_disk_is_a_not_writable_error_naming_the_free_space(bank, tmp_path, monkeypatch):
    import errno

    import peft_cvae.file_utils as file_utils

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_utils, "save_file", no_space)
    with pytest.raises(NotWritableError, match="disk is full.*MiB free"):
        bank.save_pretrained(tmp_path / "bank")
    assert not (tmp_path / "bank").exists()


def test_a_file_given_as_a_generator_is_called_a_file(tmp_path):
    (tmp_path / "generator.json").write_text("{}")
    with pytest.raises(MissingFileError, match="is a file"):
        PeftCVAEGenerator.from_pretrained(tmp_path / "generator.json")


@pytest.mark.parametrize("name", ["/no/such/generator", "./no-such-generator", "~/no-such-generator"])
def test_a_missing_path_given_as_a_generator_is_called_a_missing_folder(name):
    """A path that does not exist is a missing folder, not "an invalid Hub repo id" (issue 15 item 10)."""
    with pytest.raises(MissingFileError, match="does not exist") as error:
        PeftCVAEGenerator.from_pretrained(name)
    assert "Repo id must" not in str(error.value)
