import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModel

from peft_cvae import (
    ConditionError,
    LoraLayout,
    PeftCVAEConfig,
    PeftCVAEGenerator,
    UnknownTaskError,
    train_generator,
)
from peft_cvae.testing_utils import tiny_llama
from tests.testing_utils import TASKS, small_generator_overrides


def test_training_lowers_the_loss(trained_generator):
    history = trained_generator.training_history
    assert len(history) == 200
    assert history[-1]["reconstruction_loss"] < 0.2 * history[0]["reconstruction_loss"]
    assert history[-1]["loss"] < history[0]["loss"]


def test_save_and_load_give_identical_outputs(trained_generator, bank, tmp_path):
    trained_generator.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    loaded, info = PeftCVAEGenerator.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    assert not info["unexpected_keys"] and not info["mismatched_keys"] and not info["missing_keys"]
    for name, tensor in trained_generator.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    params, condition = bank.vectors()[:4], bank.checkpoint_conditions()[:4]
    with torch.no_grad():
        expected = trained_generator(params, condition)
        actual = loaded.eval()(params, condition)
    assert torch.equal(actual.reconstruction, expected.reconstruction)
    assert torch.equal(actual.loss, expected.loss)
    for task in TASKS:
        first = trained_generator.generate_adapter(task, seed=3).state_dict
        second = loaded.generate_adapter(task, seed=3).state_dict
        assert all(torch.equal(first[key], second[key]) for key in first)


def test_auto_classes_load_the_generator(trained_generator, tmp_path):
    trained_generator.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PeftCVAEConfig)
    model, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(model) is PeftCVAEGenerator
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.task_names == list(TASKS)
    assert torch.equal(model.task_conditions, trained_generator.task_conditions)


def test_generated_adapter_loads_into_peft_with_no_missing_or_unexpected_keys(trained_generator, tmp_path):
    adapter = trained_generator.generate_adapter("ascending", seed=0)
    adapter.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md",  # the PEFT-style card saying which generator made it
        "adapter_config.json",
        "adapter_model.safetensors",
        "peft_cvae_integrity.json",  # the sha256 of each file, checked when peft-cvae reads the adapter
    ]

    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter", adapter_name="first")
    result = peft_model.load_adapter(tmp_path / "adapter", adapter_name="generated")
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, tensor in adapter.state_dict.items():
        module_key = key.replace("lora_A.weight", "lora_A.generated.weight").replace(
            "lora_B.weight", "lora_B.generated.weight"
        )
        assert torch.equal(peft_model.state_dict()[module_key], tensor), key


def test_generated_adapter_changes_the_base_models_logits(trained_generator, tmp_path):
    tokens = torch.arange(12)[None]
    with torch.no_grad():
        base_logits = tiny_llama()(tokens).logits
        trained_generator.generate_adapter("descending", seed=0).save_pretrained(tmp_path)
        from_disk = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
        disk_logits = from_disk(tokens).logits
        in_memory = trained_generator.generate_adapter("descending", seed=0, base_model=tiny_llama()).eval()
        memory_logits = in_memory(tokens).logits
    assert not torch.allclose(disk_logits, base_logits, atol=1e-4)
    assert torch.equal(memory_logits, disk_logits)


def test_each_task_is_generated_closest_to_its_own_checkpoints(trained_generator, bank):
    vectors = bank.vectors()
    tasks = [checkpoint.task for checkpoint in bank]
    layout = trained_generator.config.lora_layout
    for task in TASKS:
        for seed in range(3):
            generated = layout.flatten(trained_generator.generate_adapter(task, seed=seed).state_dict)
            distance = {
                other: min((generated - vectors[i]).norm() for i in range(len(tasks)) if tasks[i] == other)
                for other in TASKS
            }
            assert min(distance, key=distance.get) == task, (task, seed, distance)


def test_generation_is_deterministic_per_seed(trained_generator):
    first = trained_generator.generate_adapter("repeating", seed=7).state_dict
    second = trained_generator.generate_adapter("repeating", seed=7).state_dict
    other = trained_generator.generate_adapter("repeating", seed=8).state_dict
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    mean_a = trained_generator.generate_adapter("repeating", seed=1, temperature=0).state_dict
    mean_b = trained_generator.generate_adapter("repeating", seed=2, temperature=0).state_dict
    assert all(torch.equal(mean_a[k], mean_b[k]) for k in mean_a)
    samples = trained_generator.generate_adapter("repeating", seed=7, num_samples=3)
    assert len(samples) == 3 and all(torch.equal(samples[0].state_dict[k], first[k]) for k in first)


def test_condition_tensor_and_task_name_give_the_same_adapter(trained_generator, bank):
    by_name = trained_generator.generate_adapter("ascending", seed=0).state_dict
    by_vector = trained_generator.generate_adapter(bank.condition("ascending"), seed=0).state_dict
    assert all(torch.equal(by_name[k], by_vector[k]) for k in by_name)


def test_bad_tasks_and_conditions_are_clear_errors(trained_generator):
    with pytest.raises(UnknownTaskError, match="'ascending', 'descending', 'repeating'"):
        trained_generator.generate_adapter("poetry")
    with pytest.raises(ConditionError, match=r"\(batch, 8\), got \(1, 5\)"):
        trained_generator.generate_adapter(torch.zeros(5))
    with pytest.raises(ConditionError, match="NaN"):
        trained_generator.generate_adapter(torch.full((8,), float("nan")))


def test_generator_for_smollm2_layout_has_no_dense_layer_over_the_flat_vector():
    """SmolLM2-135M, r=8 on q_proj and v_proj: 30 layers, hidden 576, 3 KV heads of 64 (460,800 LoRA parameters)."""
    keys, shapes = [], []
    for layer in range(30):
        for module, out_features in (("q_proj", 576), ("v_proj", 192)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            keys += [f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"]
            shapes += [[8, 576], [out_features, 8]]
    lora_config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    layout = LoraLayout(keys=keys, shapes=shapes, dtype="float32", lora_config=lora_config)
    assert layout.numel == 460_800
    config = PeftCVAEConfig(layout=layout.to_dict(), condition_size=384, task_names=["a", "b"])
    generator = PeftCVAEGenerator(config)
    assert config.num_tokens == 1_800
    assert max(p.numel() for p in generator.parameters()) < layout.numel
    generator_bytes = sum(t.numel() * t.element_size() for t in generator.state_dict().values())
    checkpoint_bytes = layout.numel * 4
    assert generator_bytes < 6 * checkpoint_bytes  # a bank of 120 checkpoints (20 per task, 6 tasks) is 20x larger


def test_from_bank_trains_in_bfloat16_mixed_precision_without_nan(bank, fresh_accelerate_state):
    generator = PeftCVAEGenerator.from_bank(bank, **small_generator_overrides())
    history = train_generator(
        generator, bank, epochs=5, lr=3e-3, batch_size=4, mixed_precision="bf16", show_progress=False
    )
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in history)
    adapter = generator.generate_adapter("ascending", seed=0)
    assert all(torch.isfinite(t).all() for t in adapter.state_dict.values())


@pytest.fixture(scope="module")
def memory_generator(bank):
    generator = PeftCVAEGenerator.from_bank(bank, task_memory=True, **small_generator_overrides())
    train_generator(generator, bank, epochs=30, lr=3e-3, batch_size=4, show_progress=False)
    return generator.eval()


def _task_mean(bank, task):
    return torch.stack([bank.layout.flatten(c.state_dict) for c in bank.checkpoints_of(task)]).mean(dim=0)


def test_task_memory_decodes_each_task_at_its_own_checkpoint_mean(bank, memory_generator):
    means = {task: _task_mean(bank, task) for task in bank.task_names}
    for task in bank.task_names:
        generated = bank.layout.flatten(memory_generator.generate_adapter(task, temperature=0).state_dict)
        own = (generated - means[task]).norm()
        others = min((generated - means[other]).norm() for other in bank.task_names if other != task)
        assert own < 0.05 * others, (task, own, others)


def test_task_memory_mixes_task_means_for_a_condition_between_two_tasks(bank, memory_generator):
    first, second = bank.task_names[:2]
    adapter = memory_generator.generate_adapter([first, second], weights=[0.5, 0.5], temperature=0)
    generated = bank.layout.flatten(adapter.state_dict)
    apart = (_task_mean(bank, first) - _task_mean(bank, second)).norm()
    assert (generated - _task_mean(bank, first)).norm() < apart
    assert (generated - _task_mean(bank, second)).norm() < apart


def test_task_memory_survives_save_and_load_bit_identically(memory_generator, tmp_path):
    memory_generator.save_pretrained(tmp_path)
    loaded = PeftCVAEGenerator.from_pretrained(tmp_path)
    assert loaded.config.task_memory is True
    assert torch.equal(loaded.task_memory.task_means, memory_generator.task_memory.task_means)
    task = memory_generator.config.task_names[0]
    expected = memory_generator.generate_adapter(task, seed=3).state_dict
    actual = loaded.generate_adapter(task, seed=3).state_dict
    assert all(torch.equal(actual[key], expected[key]) for key in expected)
