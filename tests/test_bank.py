import pytest
import torch
from peft import get_peft_model

from peft_cvae import EmptyBankError, LayoutMismatchError, LoraBank, MissingFileError, UnknownTaskError
from peft_cvae.testing_utils import tiny_llama
from tests.testing_utils import tiny_lora_config


def save_adapter(state_dict, config, directory):
    model = get_peft_model(tiny_llama(), config)
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(model, state_dict)
    model.save_pretrained(directory)
    return directory


def assert_banks_equal(first: LoraBank, second: LoraBank):
    assert first.layout == second.layout
    assert first.task_names == second.task_names
    assert [(c.task, c.step) for c in first] == [(c.task, c.step) for c in second]
    assert torch.equal(first.vectors(), second.vectors())
    assert torch.equal(first.condition_matrix(), second.condition_matrix())
    assert [first.description(t) for t in first.task_names] == [second.description(t) for t in second.task_names]


def test_bank_save_and_load_round_trip(bank, tmp_path):
    bank.save_pretrained(tmp_path / "bank")
    assert (tmp_path / "bank" / "bank.json").is_file()
    assert not list(tmp_path.glob(".bank.tmp-*")), "the staging folder must be gone"
    assert_banks_equal(bank, LoraBank.from_pretrained(tmp_path / "bank"))


def test_bank_from_saved_peft_adapters(bank, tmp_path):
    config = tiny_lora_config()
    adapters = {}
    for task in bank.task_names:
        adapters[task] = [
            save_adapter(c.state_dict, config, tmp_path / f"{task}-{c.step}") for c in bank.checkpoints_of(task)
        ]
    conditions = {task: bank.condition(task) for task in bank.task_names}
    rebuilt = LoraBank.from_adapters(adapters, conditions=conditions)
    assert rebuilt.task_names == bank.task_names
    assert torch.equal(rebuilt.vectors(), bank.vectors())
    assert torch.equal(rebuilt.condition_matrix(), bank.condition_matrix())


def test_bank_refuses_an_adapter_of_another_layout(bank, tmp_path):
    other = get_peft_model(tiny_llama(), tiny_lora_config(r=4))
    other.save_pretrained(tmp_path / "r4")
    first = save_adapter(bank.checkpoints[0].state_dict, tiny_lora_config(), tmp_path / "r2")
    with pytest.raises(LayoutMismatchError, match="r=4|shape"):
        LoraBank.from_adapters({"a": [first], "b": [tmp_path / "r4"]})


def test_bank_needs_two_checkpoints_and_a_condition_per_task(bank):
    small = LoraBank(bank.layout)
    small.add_checkpoint("only", bank.checkpoints[0].state_dict)
    small.set_condition("only", torch.ones(8))
    with pytest.raises(EmptyBankError, match="at least 2"):
        small.vectors()
    small.add_checkpoint("other", bank.checkpoints[1].state_dict)
    with pytest.raises(UnknownTaskError, match="set_condition"):
        small.vectors()


def test_bank_manifest_pointing_to_a_missing_file_is_a_clear_error(bank, tmp_path):
    bank.save_pretrained(tmp_path / "bank")
    (tmp_path / "bank" / "checkpoints" / "00003.safetensors").unlink()
    with pytest.raises(MissingFileError, match="00003.safetensors"):
        LoraBank.from_pretrained(tmp_path / "bank")


def test_re_encoding_every_task_may_change_the_condition_size_but_a_partial_one_may_not(bank, tmp_path):
    import copy

    from peft_cvae import ConditionError, TextTaskEncoder
    from peft_cvae.testing_utils import save_tiny_text_encoder

    encoder = TextTaskEncoder(save_tiny_text_encoder(tmp_path / "encoder"))  # 16 numbers; the bank has 8
    bank = copy.deepcopy(bank)
    before = {task: bank.condition(task) for task in bank.task_names}
    with pytest.raises(ConditionError, match="same task encoder"):
        bank.encode_conditions(encoder, {bank.task_names[0]: "numbers going up"})
    assert all(torch.equal(bank.condition(task), before[task]) for task in bank.task_names)  # left as it was

    bank.encode_conditions(encoder, {task: f"numbers {task}" for task in bank.task_names})
    assert bank.condition_size == 16
    assert bank.condition_encoder == encoder.to_dict()
    assert torch.equal(bank.condition(bank.task_names[1]), encoder.encode(f"numbers {bank.task_names[1]}"))
