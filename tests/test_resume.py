"""Resumable, deterministic training (issue 6 §4, issue 3 §3).

The main test kills a real training process with SIGKILL once it has written a checkpoint, resumes it in a new process,
and checks that the final generator is bit-identical to an uninterrupted run with the same seed in this process, and
that both generate bit-identical adapters. The other tests resume in-process, cheaply, and cover the rules around
checkpoints: only safetensors and JSON, "latest" skips incomplete folders, a fresh run never mixes with an old one.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from peft_cvae import CorruptFileError, InvalidConfigError, MissingFileError, PeftCVAEGenerator, train_generator
from peft_cvae.file_utils import read_json, read_safetensors, write_json, write_safetensors
from peft_cvae.training import latest_checkpoint
from tests.resume_worker import EPOCHS, TRAINING, new_generator

REPO_ROOT = Path(__file__).resolve().parent.parent


def _assert_same_weights(state, reference):
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(state[key], value), f"{key} differs"


@pytest.fixture(scope="module")
def finished_run(bank, tmp_path_factory):
    """An uninterrupted run with a checkpoint every 3 epochs (kept: the last 2), and its final weights."""
    output_dir = tmp_path_factory.mktemp("finished-run")
    generator = new_generator(bank)
    history = train_generator(
        generator, bank, output_dir=output_dir, checkpoint_every=3, keep_last_checkpoints=2, **TRAINING
    )
    return output_dir, {key: value.clone() for key, value in generator.state_dict().items()}, history


def test_killed_training_process_resumes_to_bit_identical_weights_and_adapters(bank, tmp_path, finished_run):
    _, reference_weights, reference_history = finished_run
    reference = new_generator(bank)
    reference.load_state_dict(reference_weights)
    bank.save_pretrained(tmp_path / "bank")
    output_dir, adapter_dir = tmp_path / "run", tmp_path / "adapter"
    command = [sys.executable, "-m", "tests.resume_worker", str(tmp_path / "bank"), str(output_dir)]

    with open(tmp_path / "killed.log", "w") as log:
        killed = subprocess.Popen(
            [*command, "--seconds-per-epoch", "0.5"], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 300
            while latest_checkpoint(output_dir) is None:
                assert killed.poll() is None, (tmp_path / "killed.log").read_text()
                assert time.monotonic() < deadline, "no checkpoint within 300 s"
                time.sleep(0.02)
            os.kill(killed.pid, signal.SIGKILL)
        finally:
            killed.kill()
            killed.wait()
    assert killed.returncode == -signal.SIGKILL
    checkpoint = latest_checkpoint(output_dir)
    assert not (output_dir / "config.json").exists()  # killed before the end
    assert read_json(checkpoint / "trainer_state.json")["epoch"] < EPOCHS

    resumed = subprocess.run(
        [*command, "--resume", "--adapter-dir", str(adapter_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.splitlines()[0]) == {"resume_from": str(checkpoint)}

    loaded = PeftCVAEGenerator.from_pretrained(output_dir)
    _assert_same_weights(loaded.state_dict(), reference_weights)
    assert read_json(output_dir / "training_history.json")["history"] == reference_history
    # The same seed gives the same adapter in another process, and from the saved generator.
    generated = read_safetensors(adapter_dir / "adapter_model.safetensors")
    _assert_same_weights(generated, reference.generate_adapter("ascending", seed=7).state_dict)
    _assert_same_weights(generated, loaded.generate_adapter("ascending", seed=7).state_dict)


def test_checkpoints_hold_only_safetensors_and_json_and_are_pruned(finished_run):
    output_dir, _, _ = finished_run
    checkpoints = sorted(path.name for path in (output_dir / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-epoch-000006", "checkpoint-epoch-000009"]  # keep_last_checkpoints=2
    suffixes = {path.suffix for path in output_dir.rglob("*") if path.is_file()}
    assert suffixes <= {".safetensors", ".json", ".md"}, suffixes
    assert sorted(path.name for path in (output_dir / "checkpoints" / checkpoints[-1]).iterdir()) == [
        "model.safetensors",
        "optimizer.safetensors",
        "rng_state.safetensors",
        "trainer_state.json",
    ]
    optimizer_state = read_safetensors(output_dir / "checkpoints" / checkpoints[-1] / "optimizer.safetensors")
    assert any(key.endswith(".exp_avg_sq") for key in optimizer_state)


def test_resume_in_process_from_a_checkpoint_continues_exactly(bank, tmp_path, finished_run):
    run_dir, reference_weights, reference_history = finished_run
    generator = new_generator(bank, init_seed=123)  # the checkpoint's weights replace any initialisation
    history = train_generator(
        generator,
        bank,
        output_dir=tmp_path,
        checkpoint_every=3,
        resume_from=run_dir / "checkpoints" / "checkpoint-epoch-000006",
        **TRAINING,
    )
    assert history == reference_history  # restored epochs 1-6, then the same 7-10
    _assert_same_weights(generator.state_dict(), reference_weights)
    assert latest_checkpoint(tmp_path).name == "checkpoint-epoch-000009"


def test_resume_latest_continues_from_the_newest_checkpoint(bank, tmp_path, finished_run):
    run_dir, reference_weights, reference_history = finished_run
    for name in ("checkpoint-epoch-000006", "checkpoint-epoch-000009"):
        _copy_checkpoint(run_dir / "checkpoints" / name, tmp_path / "checkpoints" / name)
    generator = new_generator(bank, init_seed=9)
    history = train_generator(
        generator, bank, output_dir=tmp_path, checkpoint_every=3, resume_from="latest", **TRAINING
    )  # one epoch left
    assert history == reference_history
    _assert_same_weights(generator.state_dict(), reference_weights)
    _assert_same_weights(PeftCVAEGenerator.from_pretrained(tmp_path).state_dict(), reference_weights)


def test_latest_skips_an_incomplete_checkpoint(finished_run, tmp_path):
    run_dir, _, _ = finished_run
    for name in ("checkpoint-epoch-000003", "checkpoint-epoch-000004"):
        folder = tmp_path / "checkpoints" / name
        folder.mkdir(parents=True)
        for file in (run_dir / "checkpoints" / "checkpoint-epoch-000006").iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
    (tmp_path / "checkpoints" / "checkpoint-epoch-000004" / "optimizer.safetensors").unlink()  # died mid-save
    assert latest_checkpoint(tmp_path).name == "checkpoint-epoch-000003"
    with pytest.raises(MissingFileError, match="optimizer.safetensors"):
        train_generator(None, None, resume_from=tmp_path / "checkpoints" / "checkpoint-epoch-000004")
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_a_fresh_run_refuses_a_folder_with_checkpoints_and_leaves_them(bank, finished_run):
    run_dir, _, _ = finished_run
    before = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    with pytest.raises(InvalidConfigError, match="resume_from='latest'"):
        train_generator(new_generator(bank), bank, output_dir=run_dir, checkpoint_every=3, **TRAINING)
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == before


def test_resuming_with_other_arguments_is_refused(bank, tmp_path, finished_run):
    run_dir, _, _ = finished_run
    arguments = {**TRAINING, "lr": 1e-2}
    with pytest.raises(InvalidConfigError, match="lr: checkpoint 0.003, now 0.01"):
        train_generator(
            new_generator(bank),
            bank,
            output_dir=tmp_path,
            resume_from=run_dir / "checkpoints" / "checkpoint-epoch-000006",
            **arguments,
        )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"checkpoint_every": 2}, "needs output_dir"),
        ({"resume_from": "latest"}, "pass output_dir"),
        ({"checkpoint_every": 0, "output_dir": "x"}, "positive number of epochs"),
        ({"keep_last_checkpoints": 0}, "keep_last_checkpoints must be a positive number"),
    ],
)
def test_checkpoint_arguments_are_checked_before_anything_runs(arguments, message):
    with pytest.raises(InvalidConfigError, match=message):
        train_generator(None, None, **arguments)


def _copy_checkpoint(source: Path, destination: Path) -> Path:
    destination.mkdir(parents=True)
    for file in source.iterdir():
        (destination / file.name).write_bytes(file.read_bytes())
    return destination


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        ("truncated weights", CorruptFileError, "not a readable safetensors file"),
        ("scheduler state", CorruptFileError, "cannot be restored"),
        ("trainer state fields", CorruptFileError, "fields missing"),
        ("another generator", InvalidConfigError, "weights of another generator"),
    ],
)
def test_a_damaged_checkpoint_is_refused_and_the_generator_left_as_it_was(
    bank, tmp_path, finished_run, damage, error, message
):
    run_dir, _, _ = finished_run
    checkpoint = _copy_checkpoint(run_dir / "checkpoints" / "checkpoint-epoch-000006", tmp_path / "checkpoint")
    trainer_state = read_json(checkpoint / "trainer_state.json")
    if damage == "truncated weights":
        data = (checkpoint / "model.safetensors").read_bytes()
        (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "scheduler state":
        trainer_state["scheduler"] = ["not", "a", "state", "dict"]
    elif damage == "trainer state fields":
        del trainer_state["optimizer"]
    elif damage == "another generator":
        weights = read_safetensors(checkpoint / "model.safetensors")
        weights["decoder.to_patches.bias"] = torch.zeros(3)
        write_safetensors(weights, checkpoint / "model.safetensors")
    write_json(trainer_state, checkpoint / "trainer_state.json")

    generator = new_generator(bank, init_seed=5)
    before = {key: value.clone() for key, value in generator.state_dict().items()}
    with pytest.raises(error, match=message):
        train_generator(generator, bank, resume_from=checkpoint, **TRAINING)
    _assert_same_weights(generator.state_dict(), before)
