"""`LoraBank` and the Hub: banks from PEFT adapter repos, banks pushed and pulled as dataset repos.

Everything goes through the real huggingface_hub / peft clients over HTTP to the local Hub server (`hub_env`).
"""

from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi
from peft import get_peft_model
from peft.utils import set_peft_model_state_dict

from peft_cvae import LoraBank, MissingFileError
from peft_cvae.testing_utils import tiny_llama
from tests.test_bank import assert_banks_equal
from tests.testing_utils import tiny_lora_config


def push_adapter(state_dict: dict[str, torch.Tensor], repo_id: str) -> None:
    """Push a real PEFT adapter holding `state_dict` with `PeftModel.push_to_hub`."""
    model = get_peft_model(tiny_llama(), tiny_lora_config())
    set_peft_model_state_dict(model, state_dict)
    model.push_to_hub(repo_id)


def test_from_hub_reads_pushed_peft_adapters_exactly(bank, hub_env, tmp_path):
    ascending = bank.checkpoints_of("ascending")[-2:]
    descending = bank.checkpoints_of("descending")[-1]
    push_adapter(ascending[0].state_dict, "user/bank-hub-ascending-a")
    push_adapter(ascending[1].state_dict, "user/bank-hub-ascending-b")
    push_adapter(descending.state_dict, "user/bank-hub-descending")

    loaded = LoraBank.from_hub(
        {
            "ascending": ["user/bank-hub-ascending-a", "user/bank-hub-ascending-b"],
            "descending": "user/bank-hub-descending",
        },
        conditions={"ascending": bank.condition("ascending"), "descending": bank.condition("descending")},
        descriptions={"descending": "counting down"},
    )

    assert loaded.task_names == ["ascending", "descending"] and loaded.layout.library == "peft"
    assert loaded.layout.keys == bank.layout.keys and loaded.layout.shapes == bank.layout.shapes
    for got, expected in zip(loaded, [*ascending, descending]):
        assert got.task == expected.task and got.step is None
        assert got.state_dict.keys() == expected.state_dict.keys()
        for key, tensor in expected.state_dict.items():
            assert torch.equal(got.state_dict[key], tensor), key
    assert torch.equal(loaded.condition("descending"), bank.condition("descending"))
    assert loaded.description("descending") == "counting down"

    # only the adapter's config and safetensors weights were downloaded (no README, no .bin)
    snapshots = Path(tmp_path / "hf_home" / "hub" / "models--user--bank-hub-descending" / "snapshots")
    assert sorted(path.name for path in snapshots.glob("*/*")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_bank_push_to_hub_and_from_pretrained_round_trip(bank, hub_env):
    repo_id = "user/bank-hub-dataset"
    bank.push_to_hub(repo_id)

    assert hub_env.repo_exists(repo_id, repo_type="dataset") and not hub_env.repo_exists(repo_id)
    files = hub_env.list_files(repo_id, repo_type="dataset")
    assert {"README.md", "bank.json", "conditions.safetensors"} <= set(files)
    assert sum(name.startswith("checkpoints/") for name in files) == len(bank) == 12
    card = hub_env.read_file(repo_id, "README.md", repo_type="dataset").decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert {"peft-cvae", "lora-bank"} <= set(metadata["tags"])
    assert metadata["peft_cvae"]["tasks"] == bank.task_names
    assert metadata["peft_cvae"]["checkpoints"] == 12
    assert "base_model" in metadata["peft_cvae"]
    assert f'LoraBank.from_pretrained("{repo_id}")' in card

    assert_banks_equal(bank, LoraBank.from_pretrained(repo_id))

    # pushing a smaller bank to the same repo removes the checkpoint files it no longer lists
    smaller = LoraBank(bank.layout)
    for checkpoint in bank.checkpoints_of("repeating"):
        smaller.add_checkpoint("repeating", checkpoint.state_dict, step=checkpoint.step)
    smaller.set_condition("repeating", bank.condition("repeating"), description=bank.description("repeating"))
    smaller.push_to_hub(repo_id, commit_message="only the repeating task")
    files = hub_env.list_files(repo_id, repo_type="dataset")
    assert sum(name.startswith("checkpoints/") for name in files) == 4
    assert HfApi().list_repo_commits(repo_id, repo_type="dataset")[0].title == "only the repeating task"
    assert_banks_equal(smaller, LoraBank.from_pretrained(repo_id))


def test_missing_repos_and_files_are_clear_errors(bank, hub_env, tmp_path):
    with pytest.raises(MissingFileError, match="user/bank-hub-no-such-adapter"):
        LoraBank.from_hub({"ascending": ["user/bank-hub-no-such-adapter"]})

    # a repo with a config but no safetensors weights
    push_adapter(bank.checkpoints[0].state_dict, "user/bank-hub-config-only")
    api = HfApi()
    api.delete_file("adapter_model.safetensors", "user/bank-hub-config-only")
    with pytest.raises(MissingFileError, match=r"'user/bank-hub-config-only' has no adapter_model\.safetensors"):
        LoraBank.from_hub({"ascending": "user/bank-hub-config-only"})

    push_adapter(bank.checkpoints[0].state_dict, "user/bank-hub-revision")
    with pytest.raises(MissingFileError, match="no revision 'v9'"):
        LoraBank.from_hub({"ascending": "user/bank-hub-revision"}, revision="v9")

    with pytest.raises(MissingFileError, match="from_adapters"):
        LoraBank.from_hub({"ascending": str(tmp_path / "a" / "local" / "folder")})

    with pytest.raises(MissingFileError, match="user/bank-hub-no-such-bank"):
        LoraBank.from_pretrained("user/bank-hub-no-such-bank")
    # an adapter (model) repo is not a bank (dataset) repo
    with pytest.raises(MissingFileError, match="user/bank-hub-revision"):
        LoraBank.from_pretrained("user/bank-hub-revision")
