"""`GeneratorTrainingArguments` (the single source of `train_generator`'s defaults), early stopping and divergence."""

import dataclasses
import json

import pytest
import torch

from peft_cvae import InvalidConfigError, NonFiniteError, PeftCVAEGenerator, train_generator
from peft_cvae.training import EarlyStopping
from peft_cvae.training_args import GeneratorTrainingArguments
from tests.testing_utils import small_generator_overrides

QUICK = {"epochs": 6, "lr": 3e-3, "batch_size": 4, "show_progress": False}


def new_generator(bank):
    torch.manual_seed(0)
    return PeftCVAEGenerator.from_bank(bank, **small_generator_overrides())


def test_arguments_object_and_keywords_train_the_same_generator(bank):
    by_keywords = new_generator(bank)
    history = train_generator(by_keywords, bank, **QUICK)
    by_args = new_generator(bank)
    args = GeneratorTrainingArguments(**{**QUICK, "epochs": 99})
    assert train_generator(by_args, bank, args, epochs=6) == history  # keywords override the object's fields
    for key, value in by_keywords.state_dict().items():
        assert torch.equal(by_args.state_dict()[key], value)
    assert args.epochs == 99  # the caller's object is not changed


def test_keyword_defaults_are_the_dataclass_defaults():
    args = GeneratorTrainingArguments()
    assert (args.lr, args.batch_size, args.seed, args.checkpoint_every) == (1e-3, 16, 0, None)
    assert (args.epochs, args.early_stopping_patience, args.early_stopping_min_delta) == (300, 10, 0.01)
    with pytest.raises(TypeError, match="epoch_count"):
        train_generator(None, None, epoch_count=3)


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"lr": float("inf")}, "lr must be a positive number"),
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"early_stopping_patience": -1}, "early_stopping_patience"),
        ({"early_stopping_min_delta": float("nan")}, "early_stopping_min_delta"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(overrides, words):
    with pytest.raises(InvalidConfigError, match=words):
        GeneratorTrainingArguments(**overrides)
    with pytest.raises(InvalidConfigError, match=words):
        train_generator(None, None, **overrides)


def test_early_stopping_follows_the_history():
    losses = [5.0, 4.0, 3.0, 2.999, 3.1, 3.0, 2.9995]
    stopper = EarlyStopping(patience=3, min_delta=1e-3)
    stops = [stopper.update({"epoch": epoch, "loss": loss}) for epoch, loss in enumerate(losses, start=1)]
    assert stops == [False] * 5 + [True, True]  # 2.999 is less than a 0.1% gain over 3.0: epoch 3 stays the best
    assert stopper.summary()["best_epoch"] == 3 and stopper.summary()["stopped_epoch"] == 6
    restored = EarlyStopping(3, 1e-3, [{"epoch": e, "loss": loss} for e, loss in enumerate(losses[:6], start=1)])
    assert restored.stopped and restored.summary() == {**stopper.summary()}
    assert not any(EarlyStopping(0, 1e-3).update({"epoch": e, "loss": 1.0}) for e in range(1, 50))  # 0: never


def test_training_stops_early_on_a_plateau_and_says_so(bank, tmp_path):
    generator = new_generator(bank)
    # lr 0 after warm-up: nothing changes after the first epochs, so the loss plateaus at once.
    args = GeneratorTrainingArguments(
        **{**QUICK, "epochs": 50, "lr": 1e-9}, early_stopping_patience=3, early_stopping_min_delta=0.05
    )
    history = train_generator(generator, bank, args, output_dir=str(tmp_path), checkpoint_every=100)
    assert len(history) == 4  # the best is epoch 1; three epochs without a 5% gain, then stop
    record = json.loads((tmp_path / "training_history.json").read_text())
    assert record["early_stopping"] == {
        "patience": 3,
        "min_delta": 0.05,
        "stopped_epoch": 4,
        "best_epoch": 1,
        "best_loss": history[0]["loss"],
    }
    assert len(record["history"]) == 4
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-epoch-000004"]
    resumed = new_generator(bank)
    again = train_generator(resumed, bank, args, output_dir=str(tmp_path / "again"))
    assert again == history  # early stopping is part of the deterministic run


def test_a_diverged_run_raises_and_writes_nothing(bank, tmp_path):
    generator = new_generator(bank)
    output_dir = tmp_path / "generator"
    with pytest.raises(NonFiniteError, match="Training diverged.*Nothing was written.*Lower the learning rate"):
        train_generator(generator, bank, **{**QUICK, "lr": 1e30, "max_grad_norm": None}, output_dir=str(output_dir))
    assert not output_dir.exists()


def test_arguments_round_trip_through_json(tmp_path):
    args = GeneratorTrainingArguments(epochs=7, lr=5e-4, early_stopping_patience=4)
    (tmp_path / "args.json").write_text(json.dumps(dataclasses.asdict(args)))
    assert GeneratorTrainingArguments(**json.loads((tmp_path / "args.json").read_text())) == args
