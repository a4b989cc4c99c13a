"""Bad input gives one clear error and writes nothing.

Each case asserts the exact `PeftCVAEError` subclass (which is also the built-in exception that fits: `ValueError` for
bad values, `OSError`/`FileNotFoundError` for files), that the message names what was found, what was expected and
what to do, and that nothing was left behind: no output folder, no temporary files, no half-built object, an unchanged
base model. docs/security.md lists the messages.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoHaConfig, get_peft_model
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from peft_cvae import (
    ConditionError,
    CorruptFileError,
    EmptyBankError,
    GeneratedAdapter,
    InvalidConfigError,
    LayoutMismatchError,
    LoraBank,
    LoraLayout,
    MissingFileError,
    NonFiniteError,
    NotWritableError,
    PeftCVAEError,
    PeftCVAEGenerator,
    UnknownTaskError,
    UnsupportedAdapterError,
    train_generator,
)
from peft_cvae.constants import INTEGRITY_NAME
from peft_cvae.testing_utils import tiny_llama
from tests.testing_utils import small_generator_overrides, tiny_lora_config


# ---- helpers ------------------------------------------------------------------------------------------------------
def save_peft_adapter(directory: Path, config=None, state_dict=None, base=None) -> Path:
    """Save a real PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    model = get_peft_model(base if base is not None else tiny_llama(), config or tiny_lora_config())
    if state_dict is not None:
        set_peft_model_state_dict(model, state_dict)
    model.save_pretrained(directory)
    return directory


def other_base_model() -> LlamaForCausalLM:
    """A Llama with hidden size 24 instead of 16: the same module names, other shapes."""
    return tiny_llama(hidden_size=24)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def corrupt_header(path: Path) -> None:
    """Overwrite the JSON header's first bytes, as a bad download or disk error would."""
    data = bytearray(path.read_bytes())
    data[8:24] = b"\x00" * 16
    path.write_bytes(bytes(data))


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def drop_record(folder: Path) -> None:
    """Make a saved folder look like one written before the integrity record existed (still loadable), so that a test
    reaches the check it is about rather than the record's sha256 (whose own tests are in test_reliability.py)."""
    (folder / INTEGRITY_NAME).unlink()


def drop_checksums(bank_folder: Path) -> None:
    """Make the bank look like one written before checksums were recorded (they are optional on load)."""

    def drop(manifest):
        manifest.pop("conditions_sha256", None)
        for entry in manifest["checkpoints"]:
            entry.pop("sha256", None)

    edit_json(bank_folder / "bank.json", drop)
    (bank_folder / INTEGRITY_NAME).unlink(missing_ok=True)


def copy_folder(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def assert_says(error: pytest.ExceptionInfo, *fragments: str) -> None:
    """The message contains every fragment (what was found, what was expected, what to do)."""
    message = str(error.value)
    for fragment in fragments:
        assert fragment.lower() in message.lower(), f"{fragment!r} not in {message!r}"


def listing(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.fixture(scope="module")
def saved(trained_generator, bank, tmp_path_factory):
    """Folders written by the package itself: a generator, a bank and a generated adapter."""
    root = tmp_path_factory.mktemp("saved")
    trained_generator.save_pretrained(root / "generator")
    bank.save_pretrained(root / "bank")
    trained_generator.generate_adapter("ascending", seed=0).save_pretrained(root / "adapter")
    save_peft_adapter(root / "peft_adapter", state_dict=bank.checkpoints[0].state_dict)
    return root


# ---- adapters of another layout -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case, config, base, fragments",
    [
        ("rank", tiny_lora_config(r=4), None, ["r=4", "r=2", "must share one LoRA configuration"]),
        (
            "targets",
            tiny_lora_config(target_modules=["q_proj", "k_proj", "v_proj"]),
            None,
            ["target_modules=['k_proj', 'q_proj', 'v_proj']", "target_modules=['q_proj', 'v_proj']", "must share"],
        ),
        ("alpha", tiny_lora_config(lora_alpha=8), None, ["lora_alpha=8", "lora_alpha=4"]),
        ("base model", tiny_lora_config(), "other", ["has shape (2, 24)", "expects (2, 16)", "same base model"]),
    ],
)
def test_adapter_of_another_layout_is_refused_by_the_bank(saved, tmp_path, case, config, base, fragments):
    other = save_peft_adapter(tmp_path / case, config, base=other_base_model() if base else None)
    with pytest.raises(LayoutMismatchError) as error:
        LoraBank.from_adapters({"a": [saved / "peft_adapter"], "b": [other]})
    assert isinstance(error.value, ValueError)
    assert_says(error, *fragments)


def test_generated_adapter_refuses_a_base_model_of_other_shapes_and_leaves_it_unchanged(trained_generator):
    base = other_base_model()
    modules_before = [name for name, _ in base.named_modules()]
    with pytest.raises(LayoutMismatchError) as error:
        trained_generator.generate_adapter("ascending", seed=0, base_model=base)
    assert_says(error, "has shape (2, 16)", "LoRA layer has shape (2, 24)", "Use the base model", "left as it was")
    assert [name for name, _ in base.named_modules()] == modules_before
    assert not any("lora_" in name for name, _ in base.named_parameters())


def test_generated_adapter_refuses_to_be_added_to_a_peft_model_of_other_shapes(trained_generator):
    peft_model = get_peft_model(other_base_model(), tiny_lora_config())
    adapter = trained_generator.generate_adapter("ascending", seed=0)
    with pytest.raises(LayoutMismatchError):
        adapter.to_peft_model(peft_model, adapter_name="generated")
    assert list(peft_model.peft_config) == ["default"] and peft_model.active_adapters == ["default"]


@pytest.mark.parametrize("change", ["rank", "missing key", "extra key"])
def test_adapter_state_dict_of_another_layout_is_not_written(trained_generator, bank, tmp_path, change):
    layout = trained_generator.config.lora_layout
    state_dict = dict(bank.checkpoints[0].state_dict)
    first = layout.keys[0]
    if change == "rank":
        state_dict[first] = torch.zeros(4, state_dict[first].shape[1])
    elif change == "missing key":
        del state_dict[first]
    else:
        state_dict["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(2, 16)
    with pytest.raises(LayoutMismatchError) as error:
        GeneratedAdapter(state_dict=state_dict, layout=layout).save_pretrained(tmp_path / "out")
    assert_says(error, "layout", "Use adapters" if change != "extra key" else "use adapters with the same target")
    assert listing(tmp_path) == []


def test_training_a_generator_on_a_bank_of_another_layout_is_refused(bank, tmp_path):
    generator = PeftCVAEGenerator.from_bank(bank, **small_generator_overrides())  # not the shared trained one
    r4 = save_peft_adapter(tmp_path / "r4", tiny_lora_config(r=4))
    other_bank = LoraBank.from_adapters({"a": [r4, r4]}, conditions={"a": torch.ones(8)})
    with pytest.raises(LayoutMismatchError) as error:
        train_generator(generator, other_bank, epochs=1, show_progress=False)
    assert isinstance(error.value, ValueError)
    assert_says(error, "flat LoRA vectors of shape (batch, 256), got (2, 512)", "another layout", "from_bank(bank)")


# ---- unsupported PEFT types -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, config, fragments",
    [
        ("dora", tiny_lora_config(use_dora=True), ["DoRA", "use_dora=True", "use_dora=False"]),
        (
            "ia3",
            IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=[], task_type="CAUSAL_LM"),
            ["peft_type='IA3'", "generates LoRA adapters", "peft.LoraConfig"],
        ),
        (
            "loha",
            LoHaConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
            ["peft_type='LOHA'", "peft.LoraConfig"],
        ),
    ],
)
def test_unsupported_peft_types_are_refused(tmp_path, name, config, fragments):
    folder = save_peft_adapter(tmp_path / name, config)
    for load in (lambda: LoraBank.from_adapters({"a": [folder]}), lambda: LoraLayout.from_pretrained(folder)):
        with pytest.raises(UnsupportedAdapterError) as error:
            load()
        assert isinstance(error.value, ValueError)
        assert_says(error, *fragments)


# ---- conditions and tasks -----------------------------------------------------------------------------------------
def test_two_conditions_for_one_adapter_are_refused(trained_generator):
    with pytest.raises(ConditionError) as error:
        trained_generator.generate_adapter(torch.zeros(2, 8))
    assert_says(error, "Got 2 conditions for 1 LoRA vectors", "expected one per vector", "1-D tensor")


@pytest.mark.parametrize("condition", [torch.zeros(5), torch.zeros(1, 9), torch.zeros(2, 8, 1)])
def test_condition_of_the_wrong_size_is_refused(trained_generator, condition):
    with pytest.raises(ConditionError) as error:
        trained_generator.generate_adapter(condition)
    assert isinstance(error.value, ValueError)
    assert_says(error, "(batch, 8)", "encode the task with the same encoder")


def test_condition_of_the_wrong_size_is_refused_by_the_bank(bank):
    copy = LoraBank(bank.layout)
    copy.set_condition("a", torch.ones(8))
    with pytest.raises(ConditionError) as error:
        copy.set_condition("b", torch.ones(5))
    assert_says(error, "has 5 values", "have 8", "same task encoder")
    assert copy.task_names == [] and list(copy._conditions) == ["a"]


def test_condition_with_nan_is_refused(trained_generator, bank):
    with pytest.raises(ConditionError) as error:
        trained_generator.generate_adapter(torch.full((8,), float("inf")))
    assert_says(error, "NaN or Inf")
    with pytest.raises(ConditionError):
        LoraBank(bank.layout).set_condition("a", torch.tensor([float("nan")] * 8))


def test_unknown_task_name_is_refused(trained_generator, bank):
    with pytest.raises(UnknownTaskError) as error:
        trained_generator.generate_adapter("poetry")
    assert isinstance(error.value, ValueError)
    assert_says(error, "'poetry'", "'ascending', 'descending', 'repeating'", "condition tensor of size 8")
    with pytest.raises(UnknownTaskError) as error:
        bank.condition("poetry")
    assert_says(error, "'poetry' has no condition vector", "set_condition")


# ---- empty and tiny banks -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapters", [{}, {"a": []}])
def test_empty_bank_is_refused(adapters):
    with pytest.raises(EmptyBankError) as error:
        LoraBank.from_adapters(adapters)
    assert isinstance(error.value, ValueError)
    assert_says(error, "No adapters were given", "at least one")


def test_bank_without_checkpoints_or_with_one_cannot_train(bank, saved):
    generator = PeftCVAEGenerator.from_bank(bank, **small_generator_overrides())  # not the shared trained one
    empty = LoraBank(bank.layout)
    one = LoraBank.from_adapters({"a": [saved / "peft_adapter"]}, conditions={"a": torch.ones(8)})
    for small, count in ((empty, 0), (one, 1)):
        for action in (
            lambda small=small: PeftCVAEGenerator.from_bank(small),
            lambda small=small: train_generator(generator, small, epochs=1, show_progress=False),
        ):
            with pytest.raises(EmptyBankError) as error:
                action()
            assert_says(error, f"has {count} checkpoint(s)", "at least 2", "Add checkpoints")


# ---- non-finite checkpoints ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_checkpoint_with_nan_or_inf_is_refused(bank, tmp_path, bad):
    state_dict = {key: tensor.clone() for key, tensor in bank.checkpoints[0].state_dict.items()}
    key = bank.layout.keys[3]
    state_dict[key][0, 0] = bad

    target = LoraBank(bank.layout)
    with pytest.raises(NonFiniteError) as error:
        target.add_checkpoint("a", state_dict)
    assert isinstance(error.value, ValueError)
    assert_says(error, repr(key), "NaN or Inf", "leave it out")
    assert len(target) == 0

    folder = save_peft_adapter(tmp_path / "nan", state_dict=state_dict)
    with pytest.raises(NonFiniteError) as error:
        LoraBank.from_adapters({"a": [folder]})
    assert_says(error, repr(key), "NaN or Inf")


def test_bank_folder_with_a_nan_checkpoint_is_refused(saved, tmp_path):
    folder = copy_folder(saved / "bank", tmp_path / "bank")
    checkpoint = folder / "checkpoints" / "00002.safetensors"
    tensors = load_file(checkpoint)
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, checkpoint)
    # Checkpoints are checked on their first read (verify=True: all at once, as from_bank's pass over the bank does)
    with pytest.raises(CorruptFileError) as error:  # the manifest's checksum sees the change first
        LoraBank.from_pretrained(folder, verify=True)
    assert_says(error, "00002.safetensors has sha256", "integrity record recorded", "download the whole bank again")
    drop_checksums(folder)
    with pytest.raises(NonFiniteError) as error:
        LoraBank.from_pretrained(folder, verify=True)
    assert_says(error, repr(first), "NaN or Inf")
    with pytest.raises(NonFiniteError) as error:  # a lazy bank meets it when the checkpoint is read
        LoraBank.from_pretrained(folder).vectors()
    assert_says(error, repr(first), "NaN or Inf")


# ---- truncated and corrupted files --------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", [truncate, corrupt_header], ids=["truncated", "corrupted"])
def test_damaged_adapter_weights_are_refused(saved, tmp_path, damage):
    folder = copy_folder(saved / "adapter", tmp_path / "adapter")
    drop_record(folder)
    damage(folder / "adapter_model.safetensors")
    for load in (lambda: LoraBank.from_adapters({"a": [folder]}), lambda: LoraLayout.from_pretrained(folder)):
        with pytest.raises(CorruptFileError) as error:
            load()
        assert isinstance(error.value, OSError)
        assert_says(error, "not a readable safetensors file", "corrupted or truncated", "save or download it again")


@pytest.mark.parametrize(
    "damage, record, fragments",
    [
        (truncate, True, ["has sha256", "changed or was damaged since", "save or download it again"]),
        (
            corrupt_header,
            False,
            ["not a readable safetensors file", "truncated or corrupted", "download the generator"],
        ),
    ],
    ids=["truncated", "corrupted header"],
)
def test_damaged_generator_weights_are_refused(saved, tmp_path, damage, record, fragments):
    folder = copy_folder(saved / "generator", tmp_path / "generator")
    if not record:
        drop_record(folder)
    damage(folder / "model.safetensors")
    with pytest.raises(CorruptFileError) as error:
        PeftCVAEGenerator.from_pretrained(folder)
    assert isinstance(error.value, OSError)
    assert_says(error, *fragments)


@pytest.mark.parametrize("damage", [truncate, corrupt_header], ids=["truncated", "corrupted"])
@pytest.mark.parametrize("file", ["checkpoints/00001.safetensors", "conditions.safetensors"])
def test_damaged_bank_files_are_refused(saved, tmp_path, damage, file):
    folder = copy_folder(saved / "bank", tmp_path / "bank")
    damage(folder / file)
    with pytest.raises(CorruptFileError) as error:
        LoraBank.from_pretrained(folder)
    assert_says(error, file, "has sha256", "changed or was damaged since", "download the whole")
    drop_checksums(folder)
    with pytest.raises(CorruptFileError) as error:
        LoraBank.from_pretrained(folder)
    assert_says(error, file, "not a readable safetensors file", "download or save it again")


def test_bank_checkpoint_with_a_flipped_bit_in_tensor_data_is_refused(saved, tmp_path):
    """A bit flip in tensor data still parses as safetensors; only the manifest's sha256 can tell."""
    folder = copy_folder(saved / "bank", tmp_path / "bank")
    checkpoint = folder / "checkpoints" / "00004.safetensors"
    data = bytearray(checkpoint.read_bytes())
    data[-3] ^= 0x01  # the low bits of a float32 near the end: a plausible, finite number
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError) as error:  # the header is intact: met on the first read of the data
        LoraBank.from_pretrained(folder, verify=True)
    assert_says(error, "00004.safetensors has sha256", "integrity record recorded")
    drop_checksums(folder)
    assert len(LoraBank.from_pretrained(folder)) == 12  # without the checksum it would load silently


def test_bank_manifest_with_a_malformed_checksum_is_refused(saved, tmp_path):
    folder = copy_folder(saved / "bank", tmp_path / "bank")
    drop_record(folder)
    edit_json(folder / "bank.json", lambda manifest: manifest["checkpoints"][1].__setitem__("sha256", "abc"))
    with pytest.raises(CorruptFileError) as error:
        LoraBank.from_pretrained(folder)
    assert_says(error, "malformed sha256 'abc'", "64 hex digits")


def test_bank_checkpoint_with_another_dtype_is_refused(saved, tmp_path):
    folder = copy_folder(saved / "bank", tmp_path / "bank")
    checkpoint = folder / "checkpoints" / "00000.safetensors"
    save_file({key: value.double() for key, value in load_file(checkpoint).items()}, checkpoint)
    drop_checksums(folder)
    with pytest.raises(CorruptFileError) as error:
        LoraBank.from_pretrained(folder)
    assert_says(error, "dtype ['float64']", "layout says float32", "save the bank again")


# ---- configs with missing or wrong-typed fields ------------------------------------------------------------------
def _drop(*names):
    return lambda config: [config.pop(name) for name in names]


def _set(name, value):
    return lambda config: config.__setitem__(name, value)


def _set_layout(name, value):
    return lambda config: config["layout"].__setitem__(name, value)


@pytest.mark.parametrize(
    "edit, error_class, fragments",
    [
        (_drop("layout"), InvalidConfigError, ["no LoRA layout", "from_bank"]),
        (_drop("condition_size"), CorruptFileError, ["do not fit its config.json", "mismatched", "save or download"]),
        (_drop("task_names"), InvalidConfigError, ["0 task names but 3 descriptions", "save the generator"]),
        (_set("latent_size", "eight"), InvalidConfigError, ["latent_size must be a positive integer", "'eight'"]),
        (_set("kernel_size", 4), InvalidConfigError, ["kernel_size must be odd", "got 4"]),
        (_set("kl_weight", None), InvalidConfigError, ["kl_weight must be a number >= 0", "None"]),
        (_set("task_names", 5), InvalidConfigError, ["task_names must be a list of strings", "save the generator"]),
        (_set("task_names", ["a", "a", "b"]), InvalidConfigError, ["repeated names"]),
        (_set("layout", [1, 2]), InvalidConfigError, ["layout must be a dict", "list"]),
        (_set("condition_encoder", "minilm"), InvalidConfigError, ["condition_encoder must be a dict or None"]),
        (_set("hidden_channels", 48), CorruptFileError, ["do not fit its config.json", "mismatched"]),
        (_set_layout("shapes", "16x2"), CorruptFileError, ["8 keys but no list of shapes", "save the generator"]),
        (
            _set_layout("shapes", [[2, "16"]] * 8),
            CorruptFileError,
            ["'shapes' that are not lists of positive integers"],
        ),
        (_set_layout("keys", None), CorruptFileError, ["'keys' that are not a list of strings", "save the generator"]),
        (_set_layout("dtype", "int8"), PeftCVAEError, ["dtype int8", "float dtype"]),
        (_set_layout("lora_config", None), CorruptFileError, ["lora_config of type NoneType"]),
        (lambda c: c["layout"].pop("keys"), CorruptFileError, ["lacks the fields ['keys']"]),
        (lambda c: c["layout"]["shapes"].__setitem__(0, [3, 16]), CorruptFileError, ["(3, 16)", "rank r=2"]),
        (lambda c: c["layout"]["keys"].pop(), CorruptFileError, ["7 keys but 8 shapes"]),
        (lambda c: c["layout"]["lora_config"].__setitem__("r", "two"), CorruptFileError, ["r='two'", "positive"]),
        (lambda c: c["layout"]["lora_config"].__setitem__("use_dorb", True), CorruptFileError, ["LoraConfig refuses"]),
    ],
)
def test_generator_config_with_missing_or_wrong_fields_is_refused(saved, tmp_path, edit, error_class, fragments):
    folder = copy_folder(saved / "generator", tmp_path / "generator")
    drop_record(folder)
    edit_json(folder / "config.json", edit)
    with pytest.raises(error_class) as error:
        PeftCVAEGenerator.from_pretrained(folder)
    assert isinstance(error.value, PeftCVAEError)
    assert isinstance(
        error.value, ValueError if isinstance(error.value, InvalidConfigError) else (OSError, ValueError)
    )
    assert_says(error, *fragments)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", "\xff\xfe"])
def test_generator_config_that_is_not_a_json_object_is_refused(saved, tmp_path, text):
    folder = copy_folder(saved / "generator", tmp_path / "generator")
    drop_record(folder)
    (folder / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(CorruptFileError) as error:
        PeftCVAEGenerator.from_pretrained(folder)
    assert_says(error, "config.json", "download or save it again")
    if text == "[1, 2]":
        assert_says(error, "holds a JSON list, expected an object")


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (_set("r", "two"), ["r='two'", "positive integer"]),
        (_set("lora_alpha", [4]), ["lora_alpha=[4]", "a number"]),
        (_set("target_modules", 7), ["target_modules=7"]),
        (_set("target_modules", ["q_proj", None]), ["cannot be read as a PEFT config"]),  # found by test_fuzz
        (_drop("peft_type"), ["missing required keys", "peft_type"]),
    ],
)
def test_adapter_config_with_wrong_fields_is_refused(saved, tmp_path, edit, fragments):
    folder = copy_folder(saved / "adapter", tmp_path / "adapter")
    drop_record(folder)
    edit_json(folder / "adapter_config.json", edit)
    with pytest.raises(CorruptFileError) as error:
        LoraBank.from_adapters({"a": [folder]})
    assert_says(error, "adapter_config.json", *fragments, "save the adapter again")


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (_drop("layout"), ["lacks a valid 'layout' field", "expected a dict", "save_pretrained"]),
        (_set("format_version", "1"), ["'format_version'", "expected a int"]),
        (_set("format_version", 99), ["format 99", "Upgrade peft-cvae"]),
        (_set("tasks", [1, 2]), ["task entry", "malformed", '"name": <string>']),
        (lambda m: m["checkpoints"][0].__setitem__("task", 5), ["checkpoint entry", "'task': 5", "non-empty string"]),
        (lambda m: m["checkpoints"][0].__setitem__("step", "x"), ["'step': 'x'", "integer or null"]),
        (lambda m: m["checkpoints"][0].pop("file"), ["checkpoint entry", "malformed"]),
        (_set("condition_encoder", 3), ["condition_encoder=3", "expected an object or null"]),
        (_set_layout("shapes", [["a"]] * 8), ["'shapes' that are not lists of positive integers"]),
    ],
)
def test_bank_manifest_with_missing_or_wrong_fields_is_refused(saved, tmp_path, edit, fragments):
    folder = copy_folder(saved / "bank", tmp_path / "bank")
    drop_record(folder)
    edit_json(folder / "bank.json", edit)
    with pytest.raises(CorruptFileError) as error:
        LoraBank.from_pretrained(folder)
    assert isinstance(error.value, OSError)
    assert_says(error, *fragments)


# ---- missing files ------------------------------------------------------------------------------------------------
def test_generator_folder_without_weights_is_refused(saved, tmp_path):
    folder = copy_folder(saved / "generator", tmp_path / "generator")
    (folder / "model.safetensors").unlink()
    with pytest.raises(MissingFileError) as error:
        PeftCVAEGenerator.from_pretrained(folder)
    assert isinstance(error.value, FileNotFoundError)
    assert_says(error, "has a config.json but no weights", "expected model.safetensors", "save or download")


def test_generator_folder_without_config_is_refused(saved, tmp_path):
    folder = copy_folder(saved / "generator", tmp_path / "generator")
    (folder / "config.json").unlink()
    with pytest.raises(MissingFileError) as error:
        PeftCVAEGenerator.from_pretrained(folder)
    assert_says(error, "has no config.json", "not a saved generator", "PeftCVAEGenerator.save_pretrained")


def test_generator_folder_with_only_pickled_weights_is_refused(saved, tmp_path):
    """transformers would read pytorch_model.bin with torch.load; peft-cvae reads safetensors only."""
    folder = copy_folder(saved / "generator", tmp_path / "generator")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(MissingFileError) as error:
        PeftCVAEGenerator.from_pretrained(folder)
    assert_says(error, "expected model.safetensors", "pytorch_model.bin is never read", "pickle")


def test_adapter_folder_without_weights_or_config_is_refused(saved, tmp_path):
    folder = copy_folder(saved / "adapter", tmp_path / "adapter")
    drop_record(folder)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(MissingFileError) as error:
        LoraBank.from_adapters({"a": [folder]})
    assert_says(error, "has an adapter_config.json but no adapter weights", "expected adapter_model.safetensors")
    (folder / "adapter_config.json").unlink()
    with pytest.raises(MissingFileError) as error:
        LoraBank.from_adapters({"a": [folder]})
    assert_says(error, "has no adapter_config.json", "PeftModel.save_pretrained")
    with pytest.raises(MissingFileError) as error:
        LoraBank.from_adapters({"a": [tmp_path / "no-such-adapter"]})
    assert_says(error, "does not exist", "Check the path")


def test_bank_manifest_pointing_to_missing_files_is_refused(saved, tmp_path):
    folder = copy_folder(saved / "bank", tmp_path / "bank")
    drop_record(folder)
    (folder / "checkpoints" / "00005.safetensors").unlink()
    with pytest.raises(MissingFileError) as error:
        LoraBank.from_pretrained(folder)
    assert_says(error, "lists checkpoints/00005.safetensors", "does not exist", "copy or download all of it again")
    (folder / "bank.json").unlink()
    with pytest.raises(MissingFileError) as error:
        LoraBank.from_pretrained(folder)
    assert_says(error, "bank.json does not exist")


@pytest.mark.parametrize("file", ["../outside.safetensors", "/tmp/outside.safetensors", "checkpoints/../../x"])
def test_bank_manifest_pointing_outside_the_bank_is_refused(saved, tmp_path, bank, file):
    folder = copy_folder(saved / "bank", tmp_path / "bank")
    drop_record(folder)
    save_file(dict(bank.checkpoints[0].state_dict), tmp_path / "outside.safetensors")  # a valid file, out of bounds
    edit_json(folder / "bank.json", lambda manifest: manifest["checkpoints"][0].__setitem__("file", file))
    with pytest.raises(CorruptFileError) as error:
        LoraBank.from_pretrained(folder)
    assert_says(error, "points outside the bank folder", repr(file), "expected a path inside it")


def test_bank_checkpoint_that_is_a_symlink_out_of_the_bank_is_refused(saved, tmp_path, bank):
    folder = copy_folder(saved / "bank", tmp_path / "bank")
    save_file(dict(bank.checkpoints[0].state_dict), tmp_path / "outside.safetensors")
    link = folder / "checkpoints" / "00000.safetensors"
    link.unlink()
    link.symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(CorruptFileError, match="points outside the bank folder"):
        LoraBank.from_pretrained(folder)


# ---- outputs that cannot be written -------------------------------------------------------------------------------
def _savers(trained_generator, bank):
    adapter = trained_generator.generate_adapter("ascending", seed=0)
    return {
        "generator": trained_generator.save_pretrained,
        "adapter": adapter.save_pretrained,
        "bank": bank.save_pretrained,
    }


@pytest.mark.parametrize("what", ["generator", "adapter", "bank"])
def test_output_folder_below_a_file_is_refused_and_nothing_is_written(trained_generator, bank, tmp_path, what):
    """Works as root too: no permission bit stops root, but a regular file cannot hold a folder."""
    (tmp_path / "a_file").write_text("not a folder")
    before = listing(tmp_path)
    for destination in (tmp_path / "a_file" / "out", tmp_path / "a_file"):
        with pytest.raises(NotWritableError) as error:
            _savers(trained_generator, bank)[what](destination)
        assert isinstance(error.value, OSError)
        assert_says(error, "is a file, but a folder was expected", "Choose an output folder")
        assert listing(tmp_path) == before
        assert (tmp_path / "a_file").read_text() == "not a folder"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permission bits")
@pytest.mark.parametrize("what", ["generator", "adapter", "bank"])
def test_read_only_output_folder_is_refused_and_nothing_is_written(trained_generator, bank, tmp_path, what):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        with pytest.raises(NotWritableError) as error:
            _savers(trained_generator, bank)[what](read_only / "out")
        assert_says(error, "Cannot write to", "write access")
        assert listing(read_only) == []
    finally:
        read_only.chmod(0o700)


@pytest.mark.parametrize("what", ["generator", "adapter", "bank"])
def test_permission_denied_on_the_output_folder_is_refused(trained_generator, bank, tmp_path, monkeypatch, what):
    """What a read-only folder does for a non-root user, simulated so it also runs as root (as in CI containers)."""
    from peft_cvae import file_utils

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    savers = _savers(trained_generator, bank)
    monkeypatch.setattr(file_utils.tempfile, "mkdtemp", denied)
    with pytest.raises(NotWritableError) as error:
        savers[what](tmp_path / "out")
    assert isinstance(error.value, OSError)
    assert_says(error, "Cannot write to", "Permission denied", "choose a folder you have write access to")
    assert listing(tmp_path) == []


def test_permission_denied_for_a_single_file_is_refused(tmp_path, monkeypatch):
    from peft_cvae import file_utils

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(file_utils, "open", denied, raising=False)
    with pytest.raises(NotWritableError) as error:
        file_utils.write_json({"a": 1}, tmp_path / "a.json")
    assert_says(error, "Cannot write to", "Permission denied")
    assert listing(tmp_path) == []


def test_generator_refused_at_load_leaves_no_model_behind(saved, tmp_path):
    """A failed load returns nothing and writes nothing into the folder it read."""
    folder = copy_folder(saved / "generator", tmp_path / "generator")
    truncate(folder / "model.safetensors")
    before = listing(folder)
    with pytest.raises(CorruptFileError):
        PeftCVAEGenerator.from_pretrained(folder)
    assert listing(folder) == before


def test_every_error_class_is_a_peft_cvae_error_and_a_builtin():
    expected = {
        ConditionError: ValueError,
        CorruptFileError: OSError,
        EmptyBankError: ValueError,
        InvalidConfigError: ValueError,
        LayoutMismatchError: ValueError,
        MissingFileError: FileNotFoundError,
        NonFiniteError: ValueError,
        NotWritableError: OSError,
        UnknownTaskError: ValueError,
        UnsupportedAdapterError: ValueError,
    }
    for error_class, builtin in expected.items():
        assert issubclass(error_class, PeftCVAEError) and issubclass(error_class, builtin), error_class


# ---- the same damage, downloaded from the Hub ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "damage, error_class, fragments",
    [
        (lambda d: truncate(d / "model.safetensors"), CorruptFileError, ["changed or was damaged since"]),
        (
            lambda d: (drop_record(d), corrupt_header(d / "model.safetensors")),
            CorruptFileError,
            ["not a readable safetensors file"],
        ),
        (
            lambda d: (drop_record(d), (d / "config.json").write_text("{nope")),
            CorruptFileError,
            ["config.json is not valid JSON"],
        ),
        (
            lambda d: (drop_record(d), edit_json(d / "config.json", _set("task_names", 5))),
            InvalidConfigError,
            ["list of strings"],
        ),
        (lambda d: (d / "model.safetensors").unlink(), MissingFileError, ["no weights (expected model.safetensors)"]),
        (
            lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
            MissingFileError,
            ["pytorch_model.bin is never read"],
        ),
    ],
    ids=["truncated weights", "corrupted header", "config not JSON", "config field", "no weights", "pickle only"],
)
def test_damaged_generator_repo_on_the_hub_is_refused(hub_env, saved, tmp_path, damage, error_class, fragments):
    from huggingface_hub import HfApi

    folder = copy_folder(saved / "generator", tmp_path / "generator")
    damage(folder)
    api = HfApi()
    repo_id = api.create_repo(f"user/damaged-generator-{tmp_path.name}").repo_id
    api.upload_folder(folder_path=folder, repo_id=repo_id)
    with pytest.raises(error_class) as error:
        PeftCVAEGenerator.from_pretrained(repo_id)
    assert_says(error, *fragments)


def test_bank_repo_with_a_changed_checkpoint_on_the_hub_is_refused(hub_env, saved, tmp_path):
    from huggingface_hub import HfApi

    folder = copy_folder(saved / "bank", tmp_path / "bank")
    checkpoint = folder / "checkpoints" / "00001.safetensors"
    data = bytearray(checkpoint.read_bytes())
    data[-3] ^= 0x01
    checkpoint.write_bytes(bytes(data))
    api = HfApi()
    repo_id = api.create_repo("user/changed-bank", repo_type="dataset").repo_id
    api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="dataset")
    with pytest.raises(CorruptFileError) as error:  # checkpoints are checked on first read; verify=True: all now
        LoraBank.from_pretrained(repo_id, verify=True)
    assert_says(error, "00001.safetensors has sha256", "integrity record recorded")


# ---- legacy pickled adapter weights -------------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this calls os.system: what a malicious .bin file does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_legacy_bin_adapter_with_code_in_it_is_refused_without_running_it(saved, tmp_path):
    folder = copy_folder(saved / "peft_adapter", tmp_path / "adapter")
    state_dict = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({**state_dict, "payload": _RunsCode(marker)}, folder / "adapter_model.bin")
    with pytest.raises(CorruptFileError) as error:
        LoraBank.from_adapters({"a": [folder]})
    assert_says(error, "adapter_model.bin", "was refused", "could run code", "adapter_model.safetensors")
    assert not marker.exists()


def test_legacy_bin_adapter_of_plain_tensors_is_read(saved, tmp_path, bank):
    folder = copy_folder(saved / "peft_adapter", tmp_path / "adapter")
    state_dict = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(state_dict, folder / "adapter_model.bin")
    loaded = LoraBank.from_adapters({"a": [folder]})
    expected = bank.layout.flatten(bank.checkpoints[0].state_dict)
    assert torch.equal(loaded.layout.flatten(loaded.checkpoints[0].state_dict), expected)


def test_generator_weights_with_a_flipped_bit_in_tensor_data_are_refused(saved, tmp_path, trained_generator):
    """safetensors has no checksum; the generator's integrity record holds the SHA-256 of model.safetensors."""
    folder = copy_folder(saved / "generator", tmp_path / "generator")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # low bits of a float32 of the last tensor: finite and plausible
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError) as error:
        PeftCVAEGenerator.from_pretrained(folder)
    assert_says(error, "model.safetensors has sha256", "when it was saved", "save or download")
    loaded = PeftCVAEGenerator.from_pretrained(saved / "generator")  # the intact copy loads, bit for bit
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained_generator.state_dict().items())


def test_generated_adapter_with_a_flipped_bit_in_tensor_data_is_refused(saved, tmp_path):
    """Adapters peft-cvae writes carry an integrity record; PEFT ignores that file and still loads them."""
    folder = copy_folder(saved / "adapter", tmp_path / "adapter")
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError) as error:
        LoraBank.from_adapters({"a": [folder]})
    assert_says(error, "adapter weights", "has sha256", "changed or was damaged since")
    intact = LoraBank.from_adapters({"a": [saved / "adapter"]})
    assert len(intact) == 1
