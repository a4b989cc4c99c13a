"""`LoraCheckpointCallback` inside real `transformers.Trainer.train()` runs on a tiny Llama + LoRA."""

import pytest
import torch
from peft import IA3Config, get_peft_model
from peft.utils import get_peft_model_state_dict
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_cvae import (
    InvalidConfigError,
    LayoutMismatchError,
    LoraBank,
    LoraCheckpointCallback,
    PeftCVAEGenerator,
    UnsupportedAdapterError,
    train_generator,
)
from peft_cvae.testing_utils import tiny_llama
from tests.testing_utils import task_batch, tiny_lora_config


def task_dataset(task: str, size: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`size` token sequences of a synthetic task, as the list of dicts the Trainer's default collator stacks."""
    tokens = task_batch(task, torch.Generator().manual_seed(seed), batch_size=size)
    return [{"input_ids": row, "labels": row} for row in tokens]


def run_trainer(model, task: str, callbacks, tmp_path, **overrides) -> Trainer:
    fields = {
        "output_dir": str(tmp_path / "trainer"),
        "per_device_train_batch_size": 4,
        "learning_rate": 2e-2,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**{**fields, **overrides}),
        train_dataset=task_dataset(task),
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def lora_model(**lora_overrides):
    return get_peft_model(tiny_llama(), tiny_lora_config(**lora_overrides))


def final_state(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().float() for key, value in get_peft_model_state_dict(model).items()}


def test_save_steps_in_last_fraction_and_final_state(tmp_path, fresh_accelerate_state):
    model = lora_model()
    condition = torch.linspace(-1, 1, 8)
    callback = LoraCheckpointCallback(
        None,
        "ascending",
        description="tokens that count up",
        condition=condition,
        save_steps=4,
        output_dir=tmp_path / "bank",
    )
    run_trainer(model, "ascending", [callback], tmp_path, max_steps=30)

    # 30 steps, last third = steps 21..30: multiples of 4 there are 24 and 28, plus the final step 30.
    bank = callback.bank
    assert callback.saved_steps == [24, 28, 30]
    assert [(c.task, c.step) for c in bank] == [("ascending", 24), ("ascending", 28), ("ascending", 30)]
    assert bank.description("ascending") == "tokens that count up"
    assert torch.equal(bank.condition("ascending"), condition)
    assert bank.layout.dtype == "float32" and bank.layout.lora_config["r"] == 2 and bank.layout.library == "peft"

    final = final_state(model)
    assert set(bank.checkpoints[-1].state_dict) == set(final)
    for key, value in final.items():
        assert bank.checkpoints[-1].state_dict[key].dtype == torch.float32
        assert torch.equal(bank.checkpoints[-1].state_dict[key], value), key
    # earlier checkpoints are copies taken at their step, not views of the live (still training) weights
    assert not torch.equal(bank.vectors()[0], bank.vectors()[-1])

    loaded = LoraBank.from_pretrained(tmp_path / "bank")  # written by the callback at train end
    assert [(c.task, c.step) for c in loaded] == [(c.task, c.step) for c in bank]
    assert torch.equal(loaded.vectors(), bank.vectors())
    assert loaded.description("ascending") == "tokens that count up"
    assert loaded.layout == bank.layout
    assert list((tmp_path / "bank" / "checkpoints").iterdir()), "checkpoints are written as files"
    assert all(path.suffix == ".safetensors" for path in (tmp_path / "bank" / "checkpoints").iterdir())


def test_epoch_ends_with_gradient_accumulation(tmp_path, fresh_accelerate_state):
    # 16 examples, batch 2, 2 accumulation steps: 4 optimiser steps per epoch, 6 epochs = 24 steps.
    # last_fraction=0.5 keeps steps 13..24, whose epoch ends are steps 16, 20 and 24 (epochs 4, 5, 6).
    callback = LoraCheckpointCallback(None, "descending", last_fraction=0.5)
    run_trainer(
        lora_model(),
        "descending",
        [callback],
        tmp_path,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        num_train_epochs=6,
    )
    assert [c.step for c in callback.bank] == [16, 20, 24]
    assert LoraCheckpointCallback(None, "t").first_kept_step(150) == 101  # the paper: last 50 of 150 epochs
    assert LoraCheckpointCallback(None, "t").first_kept_step(10) == 8  # steps 8, 9, 10


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_early_stop_keeps_the_last_step_once(tmp_path, fresh_accelerate_state):
    model = lora_model()
    callback = LoraCheckpointCallback(None, "repeating", save_steps=2, last_fraction=1.0)
    run_trainer(model, "repeating", [StopAt(7), callback], tmp_path, max_steps=30)
    assert callback.saved_steps == [2, 4, 6, 7]
    final = final_state(model)
    assert all(torch.equal(callback.bank.checkpoints[-1].state_dict[key], final[key]) for key in final)


def test_successive_runs_fill_one_bank_that_trains_a_generator(tmp_path, fresh_accelerate_state):
    bank = None
    conditions = {"ascending": torch.randn(8), "descending": torch.randn(8)}
    for task in conditions:
        callback = LoraCheckpointCallback(
            bank, task, description=f"{task} tokens", condition=conditions[task], save_steps=2, last_fraction=0.5
        )
        run_trainer(lora_model(), task, [callback], tmp_path, max_steps=12)
        bank = callback.bank
    assert bank.task_names == ["ascending", "descending"]
    assert [c.step for c in bank] == [8, 10, 12, 8, 10, 12]

    bank.save_pretrained(tmp_path / "bank")
    loaded = LoraBank.from_pretrained(tmp_path / "bank")
    assert torch.equal(loaded.vectors(), bank.vectors())
    assert torch.equal(loaded.condition_matrix(), bank.condition_matrix())

    # The plain decoder: with task memory the loss starts near 0 on 3 checkpoints per task (the means explain them).
    sizes = {"patch_size": 16, "hidden_channels": 16, "latent_size": 4, "num_layers": 1}
    generator = PeftCVAEGenerator.from_bank(loaded, task_memory=False, **sizes)
    history = train_generator(generator, loaded, epochs=30, lr=3e-3, batch_size=3, show_progress=False)
    assert history[-1]["loss"] < history[0]["loss"]
    adapter = generator.eval().generate_adapter("descending", seed=0)
    assert set(adapter.state_dict) == set(bank.checkpoints[0].state_dict)


def test_clear_errors(tmp_path, fresh_accelerate_state):
    with pytest.raises(UnsupportedAdapterError, match="get_peft_model"):
        run_trainer(tiny_llama(), "ascending", [LoraCheckpointCallback(None, "ascending")], tmp_path, max_steps=2)

    ia3 = get_peft_model(tiny_llama(), IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=[]))
    with pytest.raises(UnsupportedAdapterError, match="IA3"):
        run_trainer(ia3, "ascending", [LoraCheckpointCallback(None, "ascending")], tmp_path, max_steps=2)

    callback = LoraCheckpointCallback(None, "ascending")
    run_trainer(lora_model(), "ascending", [callback], tmp_path, max_steps=2)
    with pytest.raises(LayoutMismatchError, match="r=4"):
        run_trainer(lora_model(r=4), "ascending", [LoraCheckpointCallback(callback.bank, "a")], tmp_path, max_steps=2)

    with pytest.raises(InvalidConfigError, match="save_steps"):
        LoraCheckpointCallback(None, "ascending", save_steps=0)
    with pytest.raises(InvalidConfigError, match="last_fraction"):
        LoraCheckpointCallback(None, "ascending", last_fraction=0)
    with pytest.raises(InvalidConfigError, match="task"):
        LoraCheckpointCallback(None, "")


def test_bfloat16_lora_is_stored_as_float32(tmp_path, fresh_accelerate_state):
    model = get_peft_model(tiny_llama().to(torch.bfloat16), tiny_lora_config(), autocast_adapter_dtype=False)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    callback = LoraCheckpointCallback(None, "ascending", save_steps=2)
    run_trainer(model, "ascending", [callback], tmp_path, max_steps=6, bf16=True)
    assert callback.saved_steps == [6] and callback.bank.layout.dtype == "float32"
    for key, value in get_peft_model_state_dict(model).items():
        stored = callback.bank.checkpoints[-1].state_dict[key]
        assert value.dtype == torch.bfloat16 and stored.dtype == torch.float32
        assert torch.equal(stored, value.float()), key
