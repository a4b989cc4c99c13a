"""The factorised generator (`architecture="factorised"`), the SVD canonical form and the bfloat16 task memory."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

from peft_cvae import (
    CorruptFileError,
    InvalidConfigError,
    LayoutMismatchError,
    LoraLayout,
    PeftCVAEGenerator,
    train_generator,
)
from peft_cvae.canonical import canonicalize, lora_pairs
from peft_cvae.factorised import TokenLayout
from peft_cvae.testing_utils import tiny_llama
from tests.testing_utils import TASKS, small_generator_overrides

FACTORISED = {**small_generator_overrides(), "architecture": "factorised", "block_rows": 4}


@pytest.fixture(scope="module")
def factorised(bank):
    generator = PeftCVAEGenerator.from_bank(bank, task_memory=False, **FACTORISED)  # the network learns, not the means
    history = train_generator(
        generator, bank, epochs=40, lr=1e-2, batch_size=4, show_progress=False, early_stopping_patience=0
    )
    generator.training_history = history
    return generator.eval()


def _peft_load(adapter, folder):
    """Save a generated adapter and load it into a tiny Llama with PEFT; returns (PeftModel, load result)."""
    adapter.save_pretrained(folder)
    model = PeftModel.from_pretrained(tiny_llama(), folder, adapter_name="first")
    return model, model.load_adapter(folder, adapter_name="again")


def test_training_the_factorised_generator_lowers_the_loss(factorised):
    history = factorised.training_history
    assert history[-1]["reconstruction_loss"] < 0.8 * history[0]["reconstruction_loss"]
    assert history[-1]["loss"] < history[0]["loss"]


def test_factorised_round_trip_bank_to_peft_load(factorised, bank, tmp_path):
    adapter = factorised.generate_adapter("ascending", temperature=0)
    model, result = _peft_load(adapter, tmp_path / "adapter")
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, tensor in adapter.state_dict.items():
        loaded = model.state_dict()[key.replace(".weight", ".again.weight")]
        assert torch.equal(loaded, tensor), key
    bank.layout.check(adapter.state_dict)  # every key of the bank's layout, with its shape


def test_factorised_save_and_load_are_bit_identical(factorised, bank, tmp_path):
    factorised.save_pretrained(tmp_path)
    loaded, info = PeftCVAEGenerator.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.config.architecture == "factorised" and loaded.config.block_rows == 4
    for name, tensor in factorised.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    params, condition = bank.vectors()[:4], bank.checkpoint_conditions()[:4]
    with torch.no_grad():
        assert torch.equal(
            loaded.eval()(params, condition).reconstruction, factorised(params, condition).reconstruction
        )
    for task in TASKS:
        first = factorised.generate_adapter(task, seed=3).state_dict
        second = loaded.generate_adapter(task, seed=3).state_dict
        assert all(torch.equal(first[key], second[key]) for key in first)


def test_tokens_are_an_exact_inverse_and_never_mix_tensors(bank):
    tokens = TokenLayout(bank.layout, block_rows=4)
    vectors = bank.vectors()[:3]
    assert torch.equal(tokens.untokenize(tokens.tokenize(vectors)), vectors)
    # lora_A (r, in) is read as A^T: the first token of the first A tensor holds rows 0..3 of A^T
    first_a = bank.layout.unflatten(vectors[0])[bank.layout.keys[0]]
    assert ".lora_A." in bank.layout.keys[0]
    assert torch.equal(tokens.tokenize(vectors)[0, 0], first_a.t()[:4].reshape(-1))
    ids = tokens.token_ids()
    assert len(ids["block"]) == tokens.num_tokens == sum(t.num_blocks for t in tokens.tensors)
    assert tokens.num_layer_ids == 2  # the tiny Llama's two layers
    assert set(ids["kind"].tolist()) == {0, 1}  # A and B


def _llama_like_layout(num_layers: int) -> LoraLayout:
    shapes = {}
    for layer in range(num_layers):
        for module, fan_in, fan_out in (("q_proj", 64, 64), ("v_proj", 64, 16)):
            path = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            shapes[f"{path}.lora_A.weight"] = torch.zeros(4, fan_in)
            shapes[f"{path}.lora_B.weight"] = torch.zeros(fan_out, 4)
    return LoraLayout.from_state_dict(shapes, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def test_factorised_size_does_not_grow_like_the_number_of_lora_numbers():
    """10x the layers (10x N): only the layer embedding rows and the N-long offset buffer grow."""
    from peft_cvae import PeftCVAEConfig

    sizes = {}
    for num_layers in (3, 30):
        layout = _llama_like_layout(num_layers)
        config = PeftCVAEConfig(layout=layout.to_dict(), condition_size=8, architecture="factorised", block_rows=8)
        model = PeftCVAEGenerator(config)
        sizes[num_layers] = (model.num_parameters(), layout.numel, config.hidden_channels)
    (small, numel_small, channels), (large, numel_large, _) = sizes[3], sizes[30]
    assert numel_large == 10 * numel_small
    assert large - small == 2 * 27 * channels  # 27 more rows of the encoder's and the decoder's layer embedding


def test_wrong_sizes_and_bad_fields_are_clear_errors(factorised, bank, tmp_path):
    with pytest.raises(LayoutMismatchError, match="shape"):
        factorised(torch.zeros(2, bank.layout.numel + 1), bank.checkpoint_conditions()[:2])
    with pytest.raises(InvalidConfigError, match="architecture"):
        PeftCVAEGenerator.from_bank(bank, architecture="transformer")
    with pytest.raises(InvalidConfigError, match="block_rows"):
        PeftCVAEGenerator.from_bank(bank, architecture="factorised", block_rows=0)
    with pytest.raises(InvalidConfigError, match="canonical_form"):
        PeftCVAEGenerator.from_bank(bank, canonical_form="qr-please")
    with pytest.raises(InvalidConfigError, match="task_memory_dtype"):
        PeftCVAEGenerator.from_bank(bank, task_memory=True, task_memory_dtype="int8")
    factorised.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["block_rows"] = 8  # the weights were made for 4 rows per token
    (tmp_path / "config.json").write_text(json.dumps(config))
    from peft_cvae.integrity import write_integrity_record

    write_integrity_record(tmp_path)  # an edited config with a matching record: the sizes must still be checked
    with pytest.raises(CorruptFileError, match="block_size"):
        PeftCVAEGenerator.from_pretrained(tmp_path)


# ---- canonical form --------------------------------------------------------------------------------------------
def test_canonical_form_keeps_every_product_and_the_models_outputs(bank):
    layout = bank.layout
    vectors = bank.vectors()[[0, 5, 10]]
    canonical = canonicalize(vectors, layout)
    assert not torch.allclose(canonical, vectors)  # the factors did change
    pairs = lora_pairs(layout)
    assert len(pairs) == len(layout.keys) // 2
    for row in range(len(vectors)):
        before, after = layout.unflatten(vectors[row]), layout.unflatten(canonical[row])
        for key in layout.keys:
            if key.endswith("lora_A.weight"):
                partner = key.replace("lora_A", "lora_B")
                expected = before[partner] @ before[key]
                assert torch.allclose(after[partner] @ after[key], expected, atol=1e-6, rtol=1e-5), key
                assert after[key].shape == before[key].shape and after[partner].shape == before[partner].shape
    # the same numbers twice: canonical form of a canonical form is itself
    assert torch.allclose(canonicalize(canonical, layout), canonical, atol=1e-6)
    tokens = torch.arange(12)[None]
    outputs = []
    for state in (layout.unflatten(vectors[1]), layout.unflatten(canonical[1])):
        model = get_peft_model(tiny_llama(), layout.peft_config()).eval()
        result = set_peft_model_state_dict(model, state)
        assert not result.unexpected_keys
        assert not [key for key in result.missing_keys if "lora_" in key]
        with torch.no_grad():
            outputs.append(model(tokens).logits)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)


def test_generator_with_canonical_form_writes_loadable_rank_r_adapters(bank, tmp_path):
    generator = PeftCVAEGenerator.from_bank(bank, canonical_form="svd", task_memory=True, **FACTORISED).eval()
    adapter = generator.generate_adapter("descending", temperature=0)
    _, result = _peft_load(adapter, tmp_path / "adapter")
    assert result.missing_keys == [] and result.unexpected_keys == []
    # an untrained generator with task memory writes the task's canonical mean: its products are the task's
    own = canonicalize(
        torch.stack([bank.layout.flatten(c.state_dict) for c in bank.checkpoints_of("descending")]), bank.layout
    )
    generated = bank.layout.flatten(adapter.state_dict)
    assert torch.allclose(generated, own.mean(dim=0), atol=0.05 * own.abs().max())


# ---- compact task memory ----------------------------------------------------------------------------------------
def test_bfloat16_task_memory_halves_the_memory_loads_in_peft_and_stays_within_tolerance(bank, tmp_path):
    full = PeftCVAEGenerator.from_bank(bank, task_memory=True, **FACTORISED).eval()
    compact = PeftCVAEGenerator.from_bank(bank, task_memory=True, task_memory_dtype="bfloat16", **FACTORISED).eval()
    assert compact.task_memory.task_means.dtype == torch.bfloat16
    assert compact.task_memory.task_means.nbytes * 2 == full.task_memory.task_means.nbytes
    compact.save_pretrained(tmp_path / "generator")
    loaded = PeftCVAEGenerator.from_pretrained(tmp_path / "generator")
    assert loaded.task_memory.task_means.dtype == torch.bfloat16
    assert torch.equal(loaded.task_memory.task_means, compact.task_memory.task_means)
    scale = torch.repeat_interleave(full.param_scale, torch.tensor(bank.layout.sizes))
    largest = full.task_memory.task_means.abs().max(dim=0).values  # (N,) largest normalised task mean
    for task in TASKS:
        adapter = loaded.generate_adapter(task, temperature=0)
        _, result = _peft_load(adapter, tmp_path / task)
        assert result.missing_keys == [] and result.unexpected_keys == []
        reference = bank.layout.flatten(full.generate_adapter(task, temperature=0).state_dict)
        difference = (bank.layout.flatten(adapter.state_dict) - reference).abs()
        # bfloat16 keeps 8 significant bits: each stored mean is off by at most 2^-9 of itself (stated tolerance)
        assert (difference <= 2**-8 * largest * scale + 1e-7).all(), task


def test_the_card_of_a_factorised_generator_describes_its_tokens_not_patches(factorised, trained_generator):
    from peft_cvae.model_card import generator_model_card

    card = generator_model_card(factorised).text
    assert "| architecture | `factorised` |" in card
    assert "| tokens | blocks of 4 rows of each LoRA tensor" in card
    assert "patch size" not in card and "residual conv blocks" not in card
    conv_card = generator_model_card(trained_generator).text
    assert "| architecture | `conv` |" in conv_card
    assert f"| patch size | {trained_generator.config.patch_size} |" in conv_card and "| tokens |" not in conv_card
    memory = "yes (float32)" if trained_generator.config.task_memory else "no"
    assert f"| task memory | {memory} |" in conv_card
