"""Numerics under pressure: badly scaled banks, mixed precision, and non-finite adapters that must never reach disk.

- A bank whose tensors differ in scale by 1e4 (LoRA B x 1e2, LoRA A x 1e-2) trains with a finite, falling loss:
  per-tensor normalisation puts every tensor on the same footing, and generated adapters land nearest their own task.
- bf16 mixed precision (accelerate's CPU autocast; checked to be really active) gives finite generated adapters.
  fp16 through accelerate runs where accelerate can autocast fp16 (a GPU) and is skipped with the reason otherwise;
  fp16 numerics always run with torch's CPU autocast and a gradient scaler.
- A generator with broken weights (NaN) or a normalisation that overflows the adapters' dtype refuses to generate,
  and an adapter holding NaN/Inf refuses to be saved or loaded: nothing is written and base models are untouched.
"""

import pytest
import torch
from accelerate import Accelerator

from peft_cvae import GeneratedAdapter, LoraBank, NonFiniteError, PeftCVAEGenerator, train_generator
from peft_cvae.testing_utils import tiny_llama
from tests.testing_utils import TASKS, small_generator_overrides


def rescaled_bank(bank: LoraBank, a_scale: float, b_scale: float, dtype=None) -> LoraBank:
    """The same checkpoints with every lora_A tensor times `a_scale` and every lora_B tensor times `b_scale`."""
    scaled = None
    for checkpoint in bank:
        state_dict = {
            key: (tensor * (a_scale if ".lora_A." in key else b_scale)).to(dtype or tensor.dtype)
            for key, tensor in checkpoint.state_dict.items()
        }
        if scaled is None:
            from peft_cvae import LoraLayout

            scaled = LoraBank(LoraLayout.from_state_dict(state_dict, bank.layout.lora_config))
        scaled.add_checkpoint(checkpoint.task, state_dict, step=checkpoint.step)
    for task in bank.task_names:
        scaled.set_condition(task, bank.condition(task), description=bank.description(task))
    return scaled


def nearest_task(generator: PeftCVAEGenerator, bank: LoraBank, task: str, seed: int) -> str:
    """The task whose checkpoints are closest to a generated adapter, distances measured per tensor in units of that
    tensor's spread over the bank (so the 1e2 tensors do not drown the 1e-2 ones)."""
    layout = bank.layout
    sizes = torch.tensor(layout.sizes)
    scale = torch.repeat_interleave(generator.param_scale, sizes)
    generated = layout.flatten(generator.generate_adapter(task, seed=seed, temperature=0.5).state_dict) / scale
    vectors = bank.vectors() / scale
    tasks = [checkpoint.task for checkpoint in bank]
    distances = {
        other: min((generated - vectors[i]).norm() for i in range(len(tasks)) if tasks[i] == other) for other in TASKS
    }
    return min(distances, key=distances.get)


# ---- scale ----------------------------------------------------------------------------------------------------------
def test_bank_with_tensor_scales_1e4_apart_trains_finite_and_the_loss_falls(bank):
    scaled = rescaled_bank(bank, a_scale=1e-2, b_scale=1e2)
    spread = scaled.vectors().abs()
    a_keys = [i for i, key in enumerate(scaled.layout.keys) if ".lora_A." in key]
    assert spread.max() / spread[spread > 0].min() > 1e4  # really badly scaled

    generator = PeftCVAEGenerator.from_bank(scaled, task_memory=False, **small_generator_overrides())
    scale = generator.param_scale
    a_scale = scale[a_keys].mean()
    b_scale = scale[[i for i in range(len(scale)) if i not in a_keys]].mean()
    assert 1e2 < b_scale / a_scale < 1e6  # the normalisation saw the 1e4 gap (times the tensors' own ratio)

    history = train_generator(generator, scaled, epochs=120, lr=3e-3, batch_size=4, show_progress=False)
    losses = torch.tensor([record["reconstruction_loss"] for record in history])
    assert torch.isfinite(losses).all() and torch.isfinite(torch.tensor([r["kl_loss"] for r in history])).all()
    assert losses[-10:].mean() < 0.3 * losses[:5].mean()  # normalised loss falls as on the unscaled bank
    for task in TASKS:
        adapter = generator.generate_adapter(task, seed=0)
        assert all(torch.isfinite(tensor).all() for tensor in adapter.state_dict.values())
        assert nearest_task(generator, scaled, task, seed=0) == task


# ---- mixed precision -----------------------------------------------------------------------------------------------
def autocast_dtypes_during_training(generator, bank, mixed_precision: str) -> tuple[list[dict], set]:
    """Train briefly and record the dtypes the decoder's output layer computed in."""
    seen = set()
    hook = generator.decoder.to_patches.register_forward_hook(lambda module, args, output: seen.add(output.dtype))
    try:
        history = train_generator(
            generator, bank, epochs=8, lr=3e-3, batch_size=4, mixed_precision=mixed_precision, show_progress=False
        )
    finally:
        hook.remove()
    return history, seen


def test_bf16_mixed_precision_training_gives_finite_adapters(bank, fresh_accelerate_state):
    scaled = rescaled_bank(bank, a_scale=1e-2, b_scale=1e2)
    generator = PeftCVAEGenerator.from_bank(scaled, **small_generator_overrides())
    history, dtypes = autocast_dtypes_during_training(generator, scaled, "bf16")
    assert torch.bfloat16 in dtypes, f"bf16 autocast was not active (decoder computed in {dtypes})"
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in history)
    assert all(parameter.dtype == torch.float32 for parameter in generator.parameters())  # master weights stay fp32
    for task in TASKS:
        for adapter in generator.generate_adapter(task, seed=1, num_samples=3):
            assert all(torch.isfinite(tensor).all() for tensor in adapter.state_dict.values())


def test_fp16_mixed_precision_training_gives_finite_adapters(bank, fresh_accelerate_state):
    probe = Accelerator(mixed_precision="fp16")
    if not probe.native_amp:
        pytest.skip(
            f"accelerate does not autocast fp16 on {probe.device} (native_amp=False); the model's fp16 numerics are "
            "tested with torch's own CPU autocast in test_fp16_autocast_numerics_of_the_generator_on_cpu"
        )
    generator = PeftCVAEGenerator.from_bank(bank, **small_generator_overrides())
    history, dtypes = autocast_dtypes_during_training(generator, bank, "fp16")
    assert torch.float16 in dtypes
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in history)
    for task in TASKS:
        adapter = generator.generate_adapter(task, seed=1)
        assert all(torch.isfinite(tensor).all() for tensor in adapter.state_dict.values())


def test_fp16_autocast_numerics_of_the_generator_on_cpu(bank):
    """Where accelerate cannot autocast fp16 (CPU), torch can: train and generate under fp16 autocast with a gradient
    scaler, on the badly scaled bank, as a GPU fp16 run would compute."""
    scaled = rescaled_bank(bank, a_scale=1e-2, b_scale=1e2)
    torch.manual_seed(0)
    generator = PeftCVAEGenerator.from_bank(scaled, **small_generator_overrides()).train()
    optimizer = torch.optim.AdamW(generator.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cpu")
    params, conditions = scaled.vectors(), scaled.checkpoint_conditions()
    dtypes, losses = set(), []
    hook = generator.decoder.to_patches.register_forward_hook(lambda module, args, output: dtypes.add(output.dtype))
    for _ in range(30):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = generator(params, conditions).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        losses.append(loss.item())
    generator.eval()
    with torch.autocast("cpu", dtype=torch.float16):
        adapters = [generator.generate_adapter(task, seed=2, num_samples=2) for task in TASKS]
    hook.remove()
    assert torch.float16 in dtypes, dtypes
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    for adapter in (sample for samples in adapters for sample in samples):
        assert all(torch.isfinite(tensor).all() for tensor in adapter.state_dict.values())


def test_half_precision_bank_round_trips_through_a_generator(bank):
    """Adapters saved in float16 give a float16 layout; generated adapters come back in float16, finite."""
    half = rescaled_bank(bank, 1.0, 1.0, dtype=torch.float16)
    assert half.layout.dtype == "float16"
    generator = PeftCVAEGenerator.from_bank(half, **small_generator_overrides())
    train_generator(generator, half, epochs=5, lr=3e-3, batch_size=4, show_progress=False)
    adapter = generator.generate_adapter("ascending", seed=0)
    assert all(t.dtype == torch.float16 and torch.isfinite(t).all() for t in adapter.state_dict.values())


# ---- non-finite adapters never reach disk -------------------------------------------------------------------------
def broken_copy(generator: PeftCVAEGenerator) -> PeftCVAEGenerator:
    copy = PeftCVAEGenerator(generator.config)
    copy.load_state_dict(generator.state_dict())
    return copy.eval()


def test_generator_with_nan_weights_refuses_to_generate_and_writes_nothing(trained_generator, tmp_path):
    generator = broken_copy(trained_generator)
    with torch.no_grad():
        generator.decoder.to_patches.bias[3] = float("nan")
    base = tiny_llama()
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    for call in (
        lambda: generator.generate_adapter("ascending", seed=0),
        lambda: generator.generate_adapter("ascending", seed=0, num_samples=2),
        lambda: generator.generate_adapter("ascending", seed=0, base_model=base),
    ):
        with pytest.raises(NonFiniteError) as error:
            call()
        assert "NaN or Inf" in str(error.value) and "not written" in str(error.value) and "retrain" in str(error.value)
    assert not any("lora_" in name for name, _ in base.named_parameters())
    assert all(torch.equal(tensor, before[name]) for name, tensor in base.state_dict().items())
    assert list(tmp_path.iterdir()) == []


def test_generator_whose_output_overflows_the_adapter_dtype_refuses(bank):
    half = rescaled_bank(bank, 1.0, 1.0, dtype=torch.float16)
    generator = PeftCVAEGenerator.from_bank(half, **small_generator_overrides()).eval()
    with torch.no_grad():
        generator.param_offset.fill_(1e6)  # finite in float32, beyond float16's 65504
    with pytest.raises(NonFiniteError) as error:
        generator.generate_adapter("ascending", seed=0)
    assert "beyond the range of float16" in str(error.value) and "not written" in str(error.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_adapter_with_nan_or_inf_is_refused_before_writing(trained_generator, tmp_path, bad):
    good = trained_generator.generate_adapter("ascending", seed=0)
    good.save_pretrained(tmp_path / "adapter")
    before = {path.name: path.read_bytes() for path in (tmp_path / "adapter").iterdir()}
    state_dict = {key: tensor.clone() for key, tensor in good.state_dict.items()}
    key = sorted(state_dict)[-1]
    state_dict[key].view(-1)[-1] = bad
    broken = GeneratedAdapter(state_dict=state_dict, layout=good.layout, task="ascending")

    for destination in (tmp_path / "new", tmp_path / "adapter"):
        with pytest.raises(NonFiniteError) as error:
            broken.save_pretrained(destination)
        assert repr(key) in str(error.value) and "nothing was written" in str(error.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]  # no new folder, no temporary files
    assert {path.name: path.read_bytes() for path in (tmp_path / "adapter").iterdir()} == before

    base = tiny_llama()
    with pytest.raises(NonFiniteError):
        broken.to_peft_model(base)
    assert not any("lora_" in name for name, _ in base.named_parameters())
