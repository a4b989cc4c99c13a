"""`peft_cvae.functional_loss`: decoded LoRAs applied to the frozen base model, and `train_generator`'s hook for it."""

import copy

import pytest
import torch
from peft import get_peft_model
from peft.utils import set_peft_model_state_dict

from peft_cvae import LoraBank, LoraLayout, PeftCVAEGenerator, train_generator
from peft_cvae.collect import (
    CollectArguments,
    TaskData,
    TaskExample,
    _ExampleDataset,
    _RightPadCollator,
    train_task_lora,
)
from peft_cvae.errors import InvalidConfigError, LayoutMismatchError, UnknownTaskError
from peft_cvae.file_utils import read_json
from peft_cvae.functional_loss import FunctionalLoss
from peft_cvae.testing_utils import tiny_bpe_tokenizer, tiny_llama_for

CORPUS = [" ".join(str((i * 7 + k) % 100) for k in range(40)) for i in range(4)] + [
    "Q: what is 2 plus 3? A: 5",
    "what is 4 times 2? 8",
    "swap 3 and 9: 9 3",
]
# r=2 with lora_alpha=7: a scaling of 3.5, which the functional loss must apply exactly as PEFT does.
ARGS = {"steps": 6, "batch_size": 4, "max_length": 24, "lora_r": 2, "lora_alpha": 7, "lr": 3e-2, "save_steps": 1}
ARGS["last_fraction"] = 0.5
SUMS = [TaskExample(f"{a} plus {b}", str(a + b)) for a in range(1, 7) for b in (2, 5)]
SWAPS = [TaskExample(f"swap {a} and {b}", f"{b} {a}") for a in (1, 4, 8) for b in (2, 3, 6, 7)]
DOUBLES = [TaskExample(f"twice {a}", str(2 * a)) for a in range(1, 13)]
TASKS = [
    TaskData("sums", "adding", examples=SUMS),
    TaskData("swaps", "swapping", examples=SWAPS),
    TaskData("doubles", "doubling", examples=DOUBLES),
]
GENERATOR = {"patch_size": 16, "hidden_channels": 16, "latent_size": 4, "num_layers": 2}
TRAINING = {"epochs": 12, "lr": 1e-2, "batch_size": 4, "show_progress": False}


@pytest.fixture(scope="module")
def setup():
    """(base model, tokenizer, bank): a few real LoRA checkpoints per task, trained by `collect` (answer-only loss)."""
    return build_setup()


def build_setup():
    """The `setup` fixture's (base model, tokenizer, bank), for tests elsewhere (tests/test_distributed.py)."""
    tokenizer = tiny_bpe_tokenizer(CORPUS)
    base = tiny_llama_for(tokenizer, initializer_range=0.3)
    bank = None
    for index, task in enumerate(TASKS):
        condition = torch.nn.functional.one_hot(torch.tensor(index), 4).float() + 0.1
        bank = train_task_lora(base, tokenizer, task, CollectArguments(**ARGS), bank=bank, condition=condition).bank
    return base, tokenizer, bank


def functional(setup, **overrides) -> FunctionalLoss:
    base, tokenizer, bank = setup
    return FunctionalLoss(
        base, tokenizer, TASKS, bank.layout, **{"examples_per_task": 4, "max_length": 24, **overrides}
    )


def test_functional_nll_equals_a_peft_model_loaded_with_the_same_tensors(setup):
    base, tokenizer, bank = setup
    loss = functional(setup)
    assert bank.layout.lora_config["lora_alpha"] / bank.layout.lora_config["r"] == 3.5
    vector = bank.vector(len(bank) - 1) * 1.5 + 0.05 * torch.randn(bank.layout.numel, generator=torch.Generator())
    items = _ExampleDataset(TASKS[0], tokenizer, 24).items[:5]
    got = loss.task_nll(vector, items)

    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(base), bank.layout.peft_config()).eval()
    load = set_peft_model_state_dict(peft_model, bank.layout.unflatten(vector))
    assert load.unexpected_keys == []
    assert [key for key in load.missing_keys if "lora_" in key] == []
    batch = _RightPadCollator(tokenizer.pad_token_id)(items)
    with torch.no_grad():
        expected = peft_model(**batch).loss  # transformers' own causal-LM loss: the mean over answer tokens
        with peft_model.disable_adapter():
            without = peft_model(**batch).loss
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert abs(got.item() - without.item()) > 1e-2  # the LoRA really acts, so the scaling is really checked

    # The same tensors at another alpha give another NLL: the scale is part of what was compared.
    other = FunctionalLoss(base, tokenizer, TASKS, LoraLayout(**{**bank.layout.to_dict(), "lora_config": {
        **bank.layout.lora_config, "lora_alpha": 2}}), max_length=24)  # fmt: skip
    assert abs(other.task_nll(vector, items).item() - got.item()) > 1e-3


def test_gradients_reach_the_decoder_and_not_the_base_model(setup):
    _, _, bank = setup
    loss = functional(setup)
    generator = PeftCVAEGenerator.from_bank(bank, **GENERATOR).train()
    conditions = bank.checkpoint_conditions()[:4]
    params = torch.stack([bank.vector(index) for index in range(4)])
    output = generator(params, conditions)
    tasks = [bank.checkpoints[index].task for index in range(4)]
    value = loss(generator.denormalize(output.reconstruction), tasks)
    value.backward()
    assert torch.isfinite(value)
    assert generator.decoder.to_patches.weight.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in loss.model.parameters())


def test_one_sample_at_a_time_gives_the_value_and_gradient_of_the_whole_batch(setup):
    """The call frees each sample's base-model graph before the next one's pass; value and gradient must be those of
    the batch's mean NLL held in one graph."""
    _, _, bank = setup
    loss = functional(setup)
    vectors = torch.stack([bank.vector(index) for index in range(4)])  # (4, N)
    tasks = [bank.checkpoints[index].task for index in range(4)]
    scale = torch.tensor([1.5, 0.5, 2.0, 1.0])[:, None]

    held_one_at_a_time = vectors.clone().requires_grad_(True)
    value = loss(held_one_at_a_time * scale, tasks, step=3, first_row=2)
    value.backward()

    held_together = vectors.clone().requires_grad_(True)
    scaled = held_together * scale
    draws = [loss._draw(task, 3, 2 + row) for row, task in enumerate(tasks)]
    expected = torch.stack([loss.task_nll(vector, items) for vector, items in zip(scaled, draws)]).mean()
    expected.backward()

    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(held_one_at_a_time.grad, held_together.grad)
    assert held_together.grad.abs().sum() > 0
    with torch.no_grad():  # no gradient wanted: the plain forward, the same value
        torch.testing.assert_close(loss(vectors * scale, tasks, step=3, first_row=2), expected.detach())


def generated_nll(generator, bank, loss) -> float:
    """The mean answer NLL, over the tasks, of the adapter generated for each task (z = 0) on all its examples."""
    values = []
    with torch.no_grad():
        for task in bank.task_names:
            vector = generator.decode(torch.zeros(1, generator.config.latent_size), bank.condition(task)[None])[0]
            values.append(loss.task_nll(vector, loss.examples[task]).item())
    return sum(values) / len(values)


def test_training_with_the_functional_loss_lowers_the_answer_nll_of_generated_adapters(setup):
    _, _, bank = setup
    loss = functional(setup, weight=1.0)
    plain = PeftCVAEGenerator.from_bank(bank, **GENERATOR)
    plain_history = train_generator(plain, bank, **TRAINING)
    trained = PeftCVAEGenerator.from_bank(bank, **GENERATOR)
    history = train_generator(trained, bank, functional_loss=loss, **TRAINING)
    assert history[-1]["functional_loss"] < history[0]["functional_loss"]
    before, after = generated_nll(plain, bank, loss), generated_nll(trained, bank, loss)
    assert after < before - 0.1, (before, after)
    assert "functional_loss" not in plain_history[-1]


def test_the_run_record_names_the_functional_loss(setup, tmp_path):
    _, _, bank = setup
    generator = PeftCVAEGenerator.from_bank(bank, **GENERATOR)
    train_generator(generator, bank, functional_loss=functional(setup, weight=0.5), **{**TRAINING, "epochs": 1},
                    output_dir=tmp_path / "run")  # fmt: skip
    record = read_json(tmp_path / "run" / "training_history.json")
    assert record["run"]["functional_loss_weight"] == 0.5
    assert record["run"]["functional_loss_examples_per_task"] == 4
    assert set(record["history"][0]) == {"epoch", "loss", "reconstruction_loss", "kl_loss", "lr", "functional_loss"}
    assert PeftCVAEGenerator.from_pretrained(tmp_path / "run").config.task_names == bank.task_names


def test_each_sample_is_scored_on_its_own_bank_task_whatever_the_generators_task_order(setup, monkeypatch):
    """A batch carries each checkpoint's task as its index in the bank's task list; the functional loss must get the
    bank's name for it, also when the generator was built from a bank listing the same tasks in another order."""
    _, _, bank = setup
    reordered = LoraBank(bank.layout)
    for task in reversed(bank.task_names):
        for checkpoint in bank.checkpoints_of(task):
            reordered.add_checkpoint(task, checkpoint.state_dict, checkpoint.step)
        reordered.set_condition(task, bank.condition(task))
    generator = PeftCVAEGenerator.from_bank(reordered, **GENERATOR)
    assert generator.config.task_names == list(reversed(bank.task_names))
    conditions, tasks = [], []
    forward, score = PeftCVAEGenerator.forward, FunctionalLoss.__call__

    def recording_forward(self, params, condition, *args, **kwargs):
        conditions.append(condition.detach().clone())
        return forward(self, params, condition, *args, **kwargs)

    def recording_score(self, vectors, batch_tasks, **kwargs):
        tasks.append(list(batch_tasks))
        return score(self, vectors, batch_tasks, **kwargs)

    monkeypatch.setattr(PeftCVAEGenerator, "forward", recording_forward)
    monkeypatch.setattr(FunctionalLoss, "__call__", recording_score)
    train_generator(generator, bank, functional_loss=functional(setup), **{**TRAINING, "epochs": 1})
    assert len(conditions) == len(tasks) > 0
    for batch_conditions, batch_tasks in zip(conditions, tasks):
        own = [next(t for t in bank.task_names if torch.equal(bank.condition(t), row)) for row in batch_conditions]
        assert batch_tasks == own


def test_without_the_hook_training_is_bit_identical(setup):
    """weight 0 computes the functional loss but adds exactly nothing: losses and weights equal those of no hook."""
    _, _, bank = setup
    off = PeftCVAEGenerator.from_bank(bank, **GENERATOR)
    off_history = train_generator(off, bank, **{**TRAINING, "epochs": 3})
    zero = PeftCVAEGenerator.from_bank(bank, **GENERATOR)
    zero_history = train_generator(
        zero, bank, functional_loss=functional(setup, weight=0.0), **{**TRAINING, "epochs": 3}
    )
    assert [set(record) for record in off_history] == [{"epoch", "loss", "reconstruction_loss", "kl_loss", "lr"}] * 3
    assert [{k: v for k, v in record.items() if k != "functional_loss"} for record in zero_history] == off_history
    assert all(record["functional_loss"] > 0 for record in zero_history)
    for (name, weight), other in zip(off.state_dict().items(), zero.state_dict().values()):
        assert torch.equal(weight, other), name


def test_examples_are_drawn_reproducibly(setup):
    loss = functional(setup)
    first = loss._draw("sums", step=3, row=1)
    assert first == loss._draw("sums", step=3, row=1)
    assert len(first) == 4 and len({id(item) for item in first}) == 4
    assert any(a is not b for a, b in zip(first, loss._draw("sums", step=4, row=1)))


def test_bad_input_is_refused_with_a_clear_error(setup):
    base, tokenizer, bank = setup
    with pytest.raises(InvalidConfigError, match="no prompt/answer examples"):
        FunctionalLoss(base, tokenizer, [TaskData("docs", "d", texts=["1 2 3"])], bank.layout)
    with pytest.raises(InvalidConfigError, match="examples_per_task"):
        functional(setup, examples_per_task=0)
    with pytest.raises(LayoutMismatchError, match="do not match the layout"):
        config = {**bank.layout.lora_config, "target_modules": ["k_proj"]}
        other = LoraLayout(**{**bank.layout.to_dict(), "lora_config": config})
        FunctionalLoss(base, tokenizer, TASKS, other)
    loss = functional(setup)
    with pytest.raises(UnknownTaskError, match="nope"):
        loss(bank.vector(0)[None], ["nope"])
    other_alpha = LoraLayout(**{**bank.layout.to_dict(), "lora_config": {**bank.layout.lora_config, "lora_alpha": 2}})
    generator = PeftCVAEGenerator.from_bank(bank, **GENERATOR)
    with pytest.raises(LayoutMismatchError, match="lora_alpha"):
        FunctionalLoss(base, tokenizer, TASKS, other_alpha, max_length=24).check_generator(generator)
    partial = FunctionalLoss(base, tokenizer, TASKS[:2], bank.layout, max_length=24)
    with pytest.raises(UnknownTaskError, match="doubles"):
        train_generator(PeftCVAEGenerator.from_bank(bank, **GENERATOR), bank, functional_loss=partial, **TRAINING)


# ---- the functional offset (PeftCVAEConfig.functional_offset) ------------------------------------------------------
def test_an_untrained_offset_changes_nothing_and_the_cvae_loss_alone_never_moves_it(setup):
    """The offset starts at zero, so a generator with one writes what one without writes; the reconstruction the CVAE
    loss compares excludes it, so training without a functional loss leaves it at zero."""
    _, _, bank = setup
    torch.manual_seed(0)
    plain = PeftCVAEGenerator.from_bank(bank, **GENERATOR)
    torch.manual_seed(0)
    with_offset = PeftCVAEGenerator.from_bank(bank, functional_offset=True, **GENERATOR)
    assert torch.equal(with_offset.functional_offset, torch.zeros(bank.layout.numel))
    latent, condition = torch.zeros(1, GENERATOR["latent_size"]), bank.condition("sums")[None]
    torch.testing.assert_close(with_offset.decode(latent, condition), plain.decode(latent, condition))
    train_generator(with_offset, bank, **{**TRAINING, "epochs": 2})
    assert torch.equal(with_offset.functional_offset.detach(), torch.zeros(bank.layout.numel))
    # training froze it for its own run only: a user's own loop afterwards still sees a trainable offset
    assert with_offset.functional_offset.requires_grad


def test_the_functional_offset_learns_at_its_own_rate_is_written_into_adapters_and_saved(setup, tmp_path):
    _, _, bank = setup
    loss = functional(setup, on_generated=True, offset_lr=3e-2)
    generator = PeftCVAEGenerator.from_bank(bank, functional_offset=True, **GENERATOR)
    before = generated_nll(generator, bank, loss)
    history = train_generator(generator, bank, functional_loss=loss, **TRAINING)
    offset = generator.functional_offset.detach().clone()
    assert offset.abs().max() > 1e-3  # trained, by the functional loss only
    assert history[-1]["functional_loss"] < history[0]["functional_loss"]
    assert generated_nll(generator, bank, loss) < before - 0.1

    latent, condition = torch.zeros(1, GENERATOR["latent_size"]), bank.condition("swaps")[None]
    with torch.no_grad():  # what the generator writes = the decoder's LoRA + the offset, in raw units
        without = generator.denormalize(generator._decode_normalized(latent, condition, with_offset=False))
        torch.testing.assert_close(generator.decode(latent, condition), without + offset, rtol=1e-5, atol=1e-6)
    adapter = generator.generate_adapter(bank.condition("swaps"), temperature=0.0)
    flat = bank.layout.flatten({key: value.float() for key, value in adapter.state_dict.items()})
    torch.testing.assert_close(flat, (without + offset)[0], rtol=1e-5, atol=1e-6)

    generator.save_pretrained(tmp_path / "generator")
    loaded = PeftCVAEGenerator.from_pretrained(tmp_path / "generator")
    assert loaded.config.functional_offset is True
    torch.testing.assert_close(loaded.functional_offset.detach(), offset, rtol=0, atol=0)


def test_the_offset_lr_and_the_generated_path_are_recorded_and_checked(setup, tmp_path):
    _, _, bank = setup
    generator = PeftCVAEGenerator.from_bank(bank, functional_offset=True, **GENERATOR)
    loss = functional(setup, on_generated=True, offset_lr=5e-2)
    train_generator(generator, bank, functional_loss=loss, **{**TRAINING, "epochs": 1}, output_dir=tmp_path / "run")
    record = read_json(tmp_path / "run" / "training_history.json")["run"]
    assert record["functional_offset_lr"] == 5e-2 and record["functional_loss_on_generated"] is True
    for bad in ({"offset_lr": 0}, {"offset_lr": "fast"}, {"on_generated": 1}):
        with pytest.raises(InvalidConfigError, match=next(iter(bad))):
            functional(setup, **bad)
        with pytest.raises(InvalidConfigError, match=next(iter(bad))):
            loss.with_options(**{"on_generated": False, "offset_lr": None, **bad})
    # another variant's options on the same base-model copy, the original untouched
    other = loss.with_options(on_generated=False, offset_lr=None)
    assert other.model is loss.model and other.examples is loss.examples
    assert (other.on_generated, other.offset_lr) == (False, None) and (loss.on_generated, loss.offset_lr) == (
        True,
        5e-2,
    )
    with pytest.raises(InvalidConfigError, match="functional_offset"):
        PeftCVAEGenerator.from_bank(bank, functional_offset="yes", **GENERATOR)
