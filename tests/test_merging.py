"""Baselines as tools (issue 16 item 4): `merge_adapters` writes PEFT's own merges (soup, TIES, SVD, cat, nearest)
as normal PEFT adapter folders."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open

from peft_cvae.errors import InvalidArgumentError
from peft_cvae.merging import merge_adapters
from peft_cvae.testing_utils import tiny_llama
from tests.testing_utils import TASKS


def peft_reference(states, config, weights, combination_type, **kwargs) -> dict:
    """PEFT's own add_weighted_adapter on the same adapters: the state dict of the merged adapter."""
    model = get_peft_model(tiny_llama(), LoraConfig(**config), adapter_name="a0")
    for index, state in enumerate(states):
        if index:
            model.add_adapter(f"a{index}", LoraConfig(**config))
        set_peft_model_state_dict(model, state, adapter_name=f"a{index}")
    names = [f"a{index}" for index in range(len(states))]
    model.add_weighted_adapter(names, weights, "merged", combination_type=combination_type, **kwargs)
    return get_peft_model_state_dict(model, adapter_name="merged")


def load_checked(folder) -> PeftModel:
    model = PeftModel.from_pretrained(tiny_llama(), str(folder), adapter_name="first")
    result = model.load_adapter(str(folder), adapter_name="checked")
    assert result.unexpected_keys == []
    assert [key for key in result.missing_keys if "lora_" in key] == []
    return model


@pytest.fixture(scope="module")
def two_adapters(bank, tmp_path_factory):
    """The last checkpoints of two bank tasks, saved as plain PEFT adapter folders."""
    root = tmp_path_factory.mktemp("adapters")
    config = bank.layout.peft_config()
    folders, states = [], []
    for task in TASKS[:2]:
        state = bank.checkpoints_of(task)[-1].state_dict
        model = get_peft_model(tiny_llama(), bank.layout.peft_config())
        set_peft_model_state_dict(model, state)
        model.save_pretrained(root / task)
        folders.append(root / task)
        states.append(state)
    return folders, states, config.to_dict()


def test_soup_of_two_adapters_is_their_element_wise_mean_and_loads(two_adapters, tmp_path):
    folders, states, config = two_adapters
    merged = merge_adapters(folders, "soup")  # no base model needed
    merged.save_pretrained(tmp_path / "soup")

    model = load_checked(tmp_path / "soup")
    saved = get_peft_model_state_dict(model, adapter_name="checked")
    assert saved.keys() == states[0].keys()
    for key in saved:
        torch.testing.assert_close(saved[key], (states[0][key] + states[1][key]) / 2)
    assert model.peft_config["checked"].to_dict() == LoraConfig(**config).to_dict() | {"inference_mode": True}
    with safe_open(str(tmp_path / "soup" / "adapter_model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["method"] == "soup" and json.loads(metadata["sources"]) == [str(f) for f in folders]


def _saved(state, config, folder):
    model = get_peft_model(tiny_llama(), LoraConfig(**config))
    set_peft_model_state_dict(model, state)
    model.save_pretrained(folder)
    return folder


def test_soup_of_adapters_sharing_their_a_has_the_mean_delta_where_peft_linear_has_the_sum(two_adapters, tmp_path):
    """Banks train every task from one LoRA initialisation, so A barely differs between tasks. PEFT's `linear` scales A
    and B by sqrt(weight) each: with equal weights 1/n its delta is then n times the mean delta (4 BBC News LoRAs
    merged that way doubled SmolLM2's perplexity). The soup must be the mean."""
    _, states, config = two_adapters
    shared = [{k: (states[0][k] if "lora_A" in k else v) for k, v in state.items()} for state in states]
    shared.append({k: (v if "lora_A" in k else -0.5 * v) for k, v in shared[0].items()})
    folders = [_saved(state, config, tmp_path / f"shared{index}") for index, state in enumerate(shared)]
    scale = config["lora_alpha"] / config["r"]
    soup = merge_adapters(folders, "soup")
    linear = merge_adapters(folders, "linear", base_model=tiny_llama())
    linear_scale = linear.peft_config.lora_alpha / linear.peft_config.r
    for key_a in [key for key in soup.state_dict if "lora_A" in key]:
        key_b = key_a.replace("lora_A", "lora_B")
        mean_delta = sum(scale * state[key_b] @ state[key_a] for state in shared) / 3
        torch.testing.assert_close(scale * soup.state_dict[key_b] @ soup.state_dict[key_a], mean_delta)
        torch.testing.assert_close(linear_scale * linear.state_dict[key_b] @ linear.state_dict[key_a], 3 * mean_delta)


def test_soup_of_adapters_with_different_configs_is_a_clear_error(two_adapters, tmp_path):
    _, states, config = two_adapters
    other = {**config, "lora_alpha": 2 * config["lora_alpha"]}
    folders = [_saved(states[0], config, tmp_path / "a"), _saved(states[1], other, tmp_path / "b")]
    with pytest.raises(InvalidArgumentError, match="same config.*lora_alpha.*method='cat' or 'svd'"):
        merge_adapters(folders, "soup")


@pytest.mark.parametrize(("method", "kwargs"), [("ties", {"density": 0.5}), ("svd", {}), ("cat", {})])
def test_ties_svd_cat_equal_peft(two_adapters, tmp_path, method, kwargs):
    folders, states, config = two_adapters
    merged = merge_adapters(folders, method, base_model=tiny_llama(), **kwargs)
    weights = [1.0, 1.0] if method == "ties" else [0.5, 0.5]
    reference = peft_reference(states, config, weights, method, **kwargs)
    for key in reference:
        torch.testing.assert_close(merged.state_dict[key], reference[key])
    merged.save_pretrained(tmp_path / method)
    load_checked(tmp_path / method)
    if method == "cat":  # exact: the merged delta B A is the mean of the two deltas
        assert merged.peft_config.r == 2 * config["r"]
        scale, merged_scale = config["lora_alpha"] / config["r"], merged.peft_config.lora_alpha / merged.peft_config.r
        for key_a in [key for key in reference if "lora_A" in key]:
            key_b = key_a.replace("lora_A", "lora_B")
            expected = sum(0.5 * scale * state[key_b] @ state[key_a] for state in states)
            got = merged_scale * merged.state_dict[key_b] @ merged.state_dict[key_a]
            torch.testing.assert_close(got, expected)


def test_bank_soup_is_the_mean_of_the_task_means_and_leaves_the_base_model_plain(bank, tmp_path):
    base = tiny_llama()
    merged = merge_adapters(bank, "soup", base_model=base)
    assert merged.sources == list(TASKS)
    assert not any("lora_" in name for name, _ in base.named_parameters())
    means = [
        {k: torch.stack([c.state_dict[k] for c in bank.checkpoints_of(t)]).mean(0) for k in bank.layout.keys}
        for t in TASKS
    ]
    for key in bank.layout.keys:
        torch.testing.assert_close(merged.state_dict[key], sum(mean[key] for mean in means) / 3)


def test_nearest_picks_the_task_with_the_closest_condition(bank, tmp_path):
    condition = bank.condition("descending") + 0.05 * bank.condition("ascending")
    merged = merge_adapters(bank, "nearest", condition=condition)
    assert merged.sources == ["descending"] and merged.weights[0] > 0.9
    mean = torch.stack([c.state_dict[k] for c in bank.checkpoints_of("descending") for k in [bank.layout.keys[0]]])
    torch.testing.assert_close(merged.state_dict[bank.layout.keys[0]], mean.mean(0))
    merged.save_pretrained(tmp_path / "nearest")
    load_checked(tmp_path / "nearest")


def test_bad_method_and_nearest_without_condition_are_clear_errors(bank):
    with pytest.raises(InvalidArgumentError, match="Unknown merge method 'average'.*soup"):
        merge_adapters(bank, "average")
    with pytest.raises(InvalidArgumentError, match="needs a LoraBank and condition="):
        merge_adapters(bank, "nearest")
