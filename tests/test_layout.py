import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict

from peft_cvae import LayoutMismatchError, LoraLayout, NonFiniteError, UnsupportedAdapterError
from peft_cvae.testing_utils import tiny_llama
from tests.testing_utils import tiny_lora_config


def random_lora(config: LoraConfig, seed: int = 0, hidden_size: int | None = None):
    """A PeftModel whose LoRA tensors are all random (B too), so every element of the vector matters."""
    base = tiny_llama() if hidden_size is None else tiny_llama(hidden_size=hidden_size)
    model = get_peft_model(base, config)
    torch.manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(parameter)
    return model


def test_flatten_unflatten_are_exact_inverses():
    model = random_lora(tiny_lora_config())
    state_dict = get_peft_model_state_dict(model)
    layout = LoraLayout.from_peft_model(model)

    vector = layout.flatten(state_dict)
    assert vector.shape == (layout.numel,) == (sum(t.numel() for t in state_dict.values()),)
    restored = layout.unflatten(vector)
    assert list(restored) == layout.keys
    for key, tensor in state_dict.items():
        assert torch.equal(restored[key], tensor)
    assert torch.equal(layout.flatten(restored), vector)


def test_bfloat16_adapter_round_trips_in_its_dtype():
    state_dict = {
        k: v.to(torch.bfloat16) for k, v in get_peft_model_state_dict(random_lora(tiny_lora_config())).items()
    }
    layout = LoraLayout.from_state_dict(state_dict, tiny_lora_config())
    assert layout.dtype == "bfloat16"
    restored = layout.unflatten(layout.flatten(state_dict))
    for key, tensor in state_dict.items():
        assert restored[key].dtype == torch.bfloat16 and torch.equal(restored[key], tensor)


def test_layout_from_saved_adapter_matches_live_model_and_survives_json(tmp_path):
    model = random_lora(tiny_lora_config(use_rslora=True, lora_alpha=8))
    model.save_pretrained(tmp_path)
    from_disk = LoraLayout.from_pretrained(tmp_path)
    live = LoraLayout.from_peft_model(model)
    assert from_disk.keys == live.keys and from_disk.shapes == live.shapes and from_disk.dtype == live.dtype
    assert from_disk.lora_config["use_rslora"] is True and from_disk.lora_config["lora_alpha"] == 8
    assert from_disk.lora_config["target_modules"] == ["q_proj", "v_proj"]
    restored = LoraLayout.from_dict(json.loads(json.dumps(from_disk.to_dict())))
    assert restored == from_disk
    assert restored.peft_config().use_rslora is True


@pytest.mark.parametrize(
    "other, message",
    [
        (lambda: random_lora(tiny_lora_config(r=4)), "has shape (4, 16) but the layout expects (2, 16)"),
        (lambda: random_lora(tiny_lora_config(), hidden_size=32), "has shape (2, 32) but the layout expects (2, 16)"),
        (lambda: random_lora(tiny_lora_config(target_modules=["q_proj"])), "has no tensor"),
        (lambda: random_lora(tiny_lora_config(target_modules=["q_proj", "k_proj", "v_proj"])), "k_proj"),
    ],
    ids=["other-rank", "other-base-model", "fewer-targets", "more-targets"],
)
def test_mismatched_adapter_names_first_offending_key_and_shapes(other, message):
    layout = LoraLayout.from_peft_model(random_lora(tiny_lora_config()))
    with pytest.raises(LayoutMismatchError, match=r"base_model\.model\.model\.layers\.0\.self_attn\.") as error:
        layout.flatten(get_peft_model_state_dict(other()))
    assert message in str(error.value)
    assert isinstance(error.value, ValueError)


def test_dora_and_other_peft_types_are_refused_with_a_clear_error():
    model = random_lora(tiny_lora_config(use_dora=True))
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        LoraLayout.from_peft_model(model)
    with pytest.raises(UnsupportedAdapterError, match="peft_type='IA3'"):
        LoraLayout.from_state_dict({"x": torch.zeros(2)}, {"peft_type": "IA3"})


def test_non_finite_checkpoint_is_refused():
    model = random_lora(tiny_lora_config())
    state_dict = get_peft_model_state_dict(model)
    layout = LoraLayout.from_state_dict(state_dict, model.peft_config["default"])
    key = layout.keys[3]
    state_dict[key][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=key.replace(".", r"\.")):
        layout.flatten(state_dict)


def test_statistics_are_elementwise_mean_and_per_tensor_std():
    layout = LoraLayout.from_peft_model(random_lora(tiny_lora_config()))
    torch.manual_seed(0)
    vectors = torch.randn(5, layout.numel) * torch.linspace(0.01, 100, layout.numel)
    offset, scale = layout.statistics(vectors)
    assert torch.allclose(offset, vectors.mean(0))
    for index, piece in enumerate(torch.split(vectors - offset, layout.sizes, dim=1)):
        assert torch.allclose(scale[index], piece.pow(2).mean().sqrt(), rtol=1e-5)
