"""Fusion: `generate_adapter([task_a, task_b], weights=..., combine=...)` writes one LoRA for a mix of tasks."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

from peft_cvae import ConditionError
from peft_cvae.testing_utils import tiny_llama
from tests.testing_utils import small_generator_overrides


def same_adapter(first, second) -> bool:
    return all(torch.equal(first.state_dict[key], second.state_dict[key]) for key in first.state_dict)


@pytest.mark.parametrize("combine", ["condition", "parameters"])
def test_a_weight_of_one_on_a_task_gives_exactly_that_tasks_adapter(trained_generator, bank, combine):
    for seed in (0, 5):
        single = trained_generator.generate_adapter("ascending", seed=seed)
        fused = trained_generator.generate_adapter(
            ["ascending", "repeating"], weights=[1, 0], seed=seed, combine=combine
        )
        assert same_adapter(fused, single)
        other = trained_generator.generate_adapter(
            [bank.condition("ascending"), "descending"], weights=[0.0, 3.0], seed=seed, combine=combine
        )
        assert same_adapter(other, trained_generator.generate_adapter("descending", seed=seed))
    samples = trained_generator.generate_adapter(["ascending", "descending"], weights=[1, 0], seed=2, num_samples=2)
    assert [same_adapter(s, trained_generator.generate_adapter("ascending", seed=2)) for s in samples] == [True, False]


@pytest.mark.parametrize("holdout", [0.0, 0.5])
def test_parameter_fusion_with_task_memory_mixes_the_tasks_own_adapters(bank, holdout):
    """With task memory a task's adapter is its stored mean plus the decoder's correction; a parameter fusion must mix
    those, not the decoder's corrections alone (which wrote about the bank mean for every weight)."""
    from peft_cvae import PeftCVAEGenerator

    torch.manual_seed(0)
    generator = PeftCVAEGenerator.from_bank(
        bank, task_memory=True, memory_holdout=holdout, **small_generator_overrides()
    ).eval()
    tasks = ["ascending", "descending", "repeating"]
    singles = [generator.generate_adapter(task, seed=3) for task in tasks]
    fused = generator.generate_adapter(tasks, weights=[1, 0, 0], seed=3, combine="parameters")
    for key in fused.state_dict:
        torch.testing.assert_close(fused.state_dict[key], singles[0].state_dict[key])
    fused = generator.generate_adapter(tasks, weights=[0.2, 0.3, 0.5], seed=3, combine="parameters")
    for key in fused.state_dict:
        expected = sum(w * single.state_dict[key] for w, single in zip((0.2, 0.3, 0.5), singles))
        torch.testing.assert_close(fused.state_dict[key], expected)


def test_condition_fusion_decodes_the_weighted_mean_condition(trained_generator, bank):
    fused = trained_generator.generate_adapter(["ascending", "descending"], weights=[1, 3], seed=4)
    mixed = 0.25 * bank.condition("ascending") + 0.75 * bank.condition("descending")
    direct = trained_generator.generate_adapter(mixed, seed=4)
    for key, tensor in direct.state_dict.items():
        assert torch.allclose(fused.state_dict[key], tensor, atol=1e-6), key
    equal_weights = trained_generator.generate_adapter(["ascending", "descending"], seed=4)  # default: equal
    assert same_adapter(
        equal_weights, trained_generator.generate_adapter(["ascending", "descending"], weights=[2, 2], seed=4)
    )


def test_parameter_fusion_is_the_weighted_mean_of_the_decoded_adapters(trained_generator):
    fused = trained_generator.generate_adapter(
        ["ascending", "descending", "repeating"], weights=[0.2, 0.3, 0.5], seed=1, combine="parameters"
    )
    singles = [trained_generator.generate_adapter(task, seed=1) for task in ("ascending", "descending", "repeating")]
    for key in fused.state_dict:
        expected = sum(w * s.state_dict[key] for w, s in zip((0.2, 0.3, 0.5), singles))
        assert torch.allclose(fused.state_dict[key], expected, atol=1e-5), key


@pytest.mark.parametrize("combine", ["condition", "parameters"])
def test_fusion_weights_change_the_adapter(trained_generator, combine):
    layout = trained_generator.config.lora_layout

    def flat(weights):
        adapter = trained_generator.generate_adapter(
            ["ascending", "descending"], weights=weights, seed=0, temperature=0, combine=combine
        )
        return layout.flatten(adapter.state_dict)

    pure_a, pure_b, mostly_a, mostly_b = flat([1, 0]), flat([0, 1]), flat([0.8, 0.2]), flat([0.2, 0.8])
    assert not torch.equal(mostly_a, mostly_b)
    assert (mostly_a - pure_a).norm() < (mostly_a - pure_b).norm()
    assert (mostly_b - pure_b).norm() < (mostly_b - pure_a).norm()


def test_a_fused_adapter_is_a_plain_peft_adapter_that_records_its_mix(trained_generator, tmp_path):
    fused = trained_generator.generate_adapter(
        ["ascending", "repeating"], weights=[1, 3], seed=0, combine="parameters"
    )
    assert fused.task is None
    fused.save_pretrained(tmp_path / "fused")
    with safe_open(tmp_path / "fused" / "adapter_model.safetensors", "pt") as file:
        metadata = file.metadata()
    assert json.loads(metadata["fused_tasks"]) == ["ascending", "repeating"]
    assert json.loads(metadata["fusion_weights"]) == [0.25, 0.75] and metadata["combine"] == "parameters"

    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "fused", adapter_name="first")
    result = peft_model.load_adapter(tmp_path / "fused", adapter_name="fused")
    assert result.missing_keys == [] and result.unexpected_keys == []
    in_memory = trained_generator.generate_adapter(
        ["ascending", "repeating"], weights=[1, 3], seed=0, combine="parameters", base_model=tiny_llama()
    )
    tokens = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(in_memory.eval()(tokens).logits, peft_model.eval()(tokens).logits)


def test_bad_fusion_requests_are_clear_errors(trained_generator):
    with pytest.raises(ConditionError, match="Got 3 weights for 2 tasks"):
        trained_generator.generate_adapter(["ascending", "descending"], weights=[1, 1, 1])
    with pytest.raises(ConditionError, match=r"finite, >= 0 and not all 0, got \[1.0, -1.0\]"):
        trained_generator.generate_adapter(["ascending", "descending"], weights=[1, -1])
    with pytest.raises(ConditionError, match="not all 0"):
        trained_generator.generate_adapter(["ascending", "descending"], weights=[0, 0])
    with pytest.raises(ConditionError, match="not all 0"):
        trained_generator.generate_adapter(["ascending", "descending"], weights=[float("nan"), 1])
    with pytest.raises(ConditionError, match="Got 2 weights for 1 tasks"):
        trained_generator.generate_adapter("ascending", weights=[1, 1])
    with pytest.raises(ConditionError, match="list of tasks to fuse is empty"):
        trained_generator.generate_adapter([])
    with pytest.raises(ConditionError, match=r"\(batch, 8\), got \(1, 5\)"):
        trained_generator.generate_adapter(["ascending", torch.zeros(5)])
