"""Every causal-LM family peft-cvae is tested on, end to end at test size: bank -> generator -> generated adapter ->
PEFT, and the Eq. 1 in-context task encoder on the family's hidden states.

The families (`peft_cvae.testing_utils.TINY_CAUSAL_LM_FAMILIES`) differ where the flatten / unflatten of a LoRA could
break: Gemma3 (query/key norms, head size not hidden / heads, sliding-window layers, a text config), Qwen2 (attention
biases, grouped-query attention so `v_proj` is narrower than `q_proj`), Qwen3, Mistral, Phi-3 (q, k, v fused in one
`qkv_proj`) and GPT-2 (`Conv1D` `c_attn`, stored transposed: `fan_in_fan_out=True`). Llama is the reference.

The generator's task memory is made sharp enough to pick a seen task exactly (as in test_lora_variants), so a seen
task decodes to the mean of its checkpoints: the test can then demand the generated adapter's tensors and logits
equal those of that mean, loaded through PEFT with no missing and no unexpected key.
"""

import math

import pytest
import torch
from peft import get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from peft_cvae import HiddenStateTaskEncoder, LoraBank, LoraLayout, PeftCVAEGenerator
from peft_cvae.testing_utils import TINY_CAUSAL_LM_FAMILIES
from tests.testing_utils import small_generator_overrides

FAMILIES = sorted(TINY_CAUSAL_LM_FAMILIES)
TASKS = ("first", "second")
EXAMPLES = {"first": ["1 2 3 4 5", "2 3 4 5 6"], "second": ["9 7 5 3 1", "8 6 4 2 0 9"]}


class DigitTokenizer:
    """Space-separated integers -> token ids (a real tokenizer is not what these tests are about)."""

    pad_token_id = 0
    padding_side = "right"

    def __call__(self, texts, truncation=False, max_length=None):
        ids = [[int(token) + 1 for token in text.split()] for text in texts]
        return {"input_ids": [row[:max_length] if truncation and max_length else row for row in ids]}


def random_checkpoints(family, model, seed: int = 0) -> list[dict]:
    """2 tasks x 2 PEFT state dicts of the family's LoRA with random values (lora_B included, so outputs change)."""
    template = get_peft_model_state_dict(get_peft_model(model, family.lora_config()))
    generator = torch.Generator().manual_seed(seed)
    return [
        {key: 0.3 * torch.randn(value.shape, generator=generator) for key, value in template.items()}
        for _ in range(len(TASKS) * 2)
    ]


def logits_with_adapter(family, folder, tokens) -> torch.Tensor:
    model = get_peft_model(family.build(), family.lora_config())
    result = model.load_adapter(folder, adapter_name="default")
    assert result.missing_keys == [] and result.unexpected_keys == []
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.parametrize("name", FAMILIES)
def test_family_round_trips_through_bank_generator_and_peft(name, tmp_path):
    family = TINY_CAUSAL_LM_FAMILIES[name]
    checkpoints = random_checkpoints(family, family.build())
    layout = LoraLayout.from_state_dict(checkpoints[0], family.lora_config())
    assert layout.peft_config().fan_in_fan_out is family.fan_in_fan_out
    bank = LoraBank(layout)
    for index, state in enumerate(checkpoints):
        bank.add_checkpoint(TASKS[index // 2], state, step=index % 2)
    encoder = HiddenStateTaskEncoder(family.build(), DigitTokenizer(), name_or_path=None)
    for task in TASKS:  # Eq. 1 conditions: the family's own hidden states over each task's examples
        bank.set_condition(task, encoder.encode(EXAMPLES[task]))
    bank.save_pretrained(tmp_path / "bank")
    bank = LoraBank.from_pretrained(tmp_path / "bank")

    generator = PeftCVAEGenerator.from_bank(bank, task_memory=True, **small_generator_overrides()).eval()
    with torch.no_grad():
        generator.task_memory.log_temperature.fill_(math.log(1e-4))  # a seen task's own condition picks it exactly
    generator.save_pretrained(tmp_path / "generator")
    generator = PeftCVAEGenerator.from_pretrained(tmp_path / "generator").eval()
    adapter = generator.generate_adapter(examples=EXAMPLES["first"], temperature=0, task_encoder=encoder)
    adapter.save_pretrained(tmp_path / "generated")

    saved = load_file(tmp_path / "generated" / "adapter_model.safetensors")
    assert set(saved) == set(checkpoints[0])
    assert all(torch.equal(saved[key], adapter.state_dict[key]) for key in saved)
    mean = {key: (checkpoints[0][key] + checkpoints[1][key]) / 2 for key in checkpoints[0]}
    for key, value in mean.items():
        torch.testing.assert_close(saved[key], value, atol=1e-5, rtol=1e-4)

    reference = get_peft_model(family.build(), family.lora_config())
    set_peft_model_state_dict(reference, mean)
    reference.save_pretrained(tmp_path / "mean")
    tokens = torch.arange(1, 13).reshape(2, 6)
    expected = logits_with_adapter(family, tmp_path / "mean", tokens)
    with torch.no_grad():
        plain = family.build()(input_ids=tokens).logits
    assert not torch.allclose(expected, plain)  # the adapter changes the output: the comparison means something
    torch.testing.assert_close(logits_with_adapter(family, tmp_path / "generated", tokens), expected)


@pytest.mark.parametrize("name", FAMILIES)
def test_hidden_state_encoder_on_family(name):
    """Eq. 1 on each family: one vector of the (text) config's hidden size, deterministic, independent of padding
    and of how the examples are batched, and different for different tasks."""
    family = TINY_CAUSAL_LM_FAMILIES[name]
    model = family.build()
    encoder = HiddenStateTaskEncoder(model, DigitTokenizer(), batch_size=2)
    assert encoder.condition_size == model.config.get_text_config().hidden_size == 16
    vector = encoder.encode(EXAMPLES["second"])
    assert vector.shape == (16,) and vector.dtype == torch.float32 and torch.isfinite(vector).all()
    assert torch.equal(vector, encoder.encode(EXAMPLES["second"]))
    one_by_one = HiddenStateTaskEncoder(model, DigitTokenizer(), batch_size=1).encode(EXAMPLES["second"])
    torch.testing.assert_close(vector, one_by_one, atol=1e-5, rtol=1e-4)  # padding never changes the result
    left = DigitTokenizer()
    left.padding_side = "left"
    torch.testing.assert_close(
        HiddenStateTaskEncoder(model, left).encode(EXAMPLES["second"]), vector, atol=1e-5, rtol=1e-4
    )
    assert not torch.allclose(encoder.encode(EXAMPLES["first"]), vector)
