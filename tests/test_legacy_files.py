"""Files saved by peft-cvae before the single integrity record (commit c9feab9) still load, and still load right.

The fixtures in tests/fixtures/legacy_c9feab9/ were written by that commit's code (see make_legacy_c9feab9.py): a bank
whose manifest records per-file sha256, a generator whose model.safetensors carries its data hash in the safetensors
metadata, and an adapter that generator wrote (seed 1, temperature 0.5).
"""

import shutil
from pathlib import Path

import pytest
import torch
from peft.utils import load_peft_weights

from peft_cvae import CorruptFileError, LoraBank, LoraLayout, PeftCVAEGenerator

LEGACY = Path(__file__).parent / "fixtures" / "legacy_c9feab9"


def test_legacy_bank_loads_with_its_checkpoints_and_conditions():
    bank = LoraBank.from_pretrained(LEGACY / "bank")
    assert bank.task_names == ["up", "down"] and len(bank) == 6
    assert [checkpoint.step for checkpoint in bank] == [10, 20, 30, 10, 20, 30]
    assert bank.condition_matrix().shape == (2, 4)
    assert bank.description("down") == "numbers that go down"


def test_legacy_generator_regenerates_the_legacy_adapter_exactly():
    generator = PeftCVAEGenerator.from_pretrained(LEGACY / "generator")
    adapter = generator.generate_adapter("down", seed=1, temperature=0.5)
    saved = load_peft_weights(str(LEGACY / "adapter"), device="cpu")
    assert sorted(saved) == sorted(adapter.state_dict)
    for key, tensor in saved.items():
        assert torch.equal(adapter.state_dict[key], tensor), key
    assert LoraLayout.from_pretrained(LEGACY / "adapter").keys == generator.config.lora_layout.keys


def test_legacy_bank_trains_a_generator():
    bank = LoraBank.from_pretrained(LEGACY / "bank")
    generator = PeftCVAEGenerator.from_bank(bank, patch_size=8, hidden_channels=8, latent_size=4, num_layers=1)
    assert generator.generate_adapter("up", temperature=0.0).state_dict.keys() == set(bank.layout.keys)


def test_legacy_generator_data_hash_is_still_checked(tmp_path):
    folder = tmp_path / "generator"
    shutil.copytree(LEGACY / "generator", folder)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-3] ^= 0x01  # a flipped bit in the tensor data, covered by the hash in the file's metadata
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="sha256"):
        PeftCVAEGenerator.from_pretrained(folder)


def test_legacy_bank_manifest_hashes_are_still_checked(tmp_path):
    folder = tmp_path / "bank"
    shutil.copytree(LEGACY / "bank", folder)
    data = bytearray((folder / "conditions.safetensors").read_bytes())
    data[-1] ^= 0x01
    (folder / "conditions.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="sha256"):
        LoraBank.from_pretrained(folder)


def test_a_config_without_task_memory_loads_as_the_plain_generator_it_was(tmp_path):
    """Generators saved before `task_memory` existed have no such key in config.json. The recommended design became
    `from_bank`'s default, not `PeftCVAEConfig`'s, so such a generator still loads as the plain decoder it was."""
    import json

    from peft_cvae.integrity import write_integrity_record

    bank = LoraBank.from_pretrained(LEGACY / "bank")
    sizes = {"patch_size": 8, "hidden_channels": 8, "latent_size": 4, "num_layers": 1}
    assert PeftCVAEGenerator.from_bank(bank, **sizes).config.task_memory is True  # the default of new generators
    plain = PeftCVAEGenerator.from_bank(bank, task_memory=False, **sizes)
    plain.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["task_memory"], config["task_memory_dtype"]  # as written before the fields existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    write_integrity_record(tmp_path / "old")  # the old folder's record matched its own config
    loaded = PeftCVAEGenerator.from_pretrained(tmp_path / "old")
    assert loaded.config.task_memory is False and loaded.task_memory is None
    for name, tensor in plain.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(
        loaded.generate_adapter("up", seed=0).state_dict[bank.layout.keys[0]],
        plain.generate_adapter("up", seed=0).state_dict[bank.layout.keys[0]],
    )
