"""Data-parallel training in real processes, mixed precision and trackers (issue 3 §3).

`accelerate.debug_launcher` forks two CPU processes that talk over gloo (`accelerate launch --cpu --num_processes 2`
would start only one), from a fresh interpreter (tests/distributed_worker.py says why). Each rank trains with half the
global batch; the result must match one process trained on the whole global batch.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from peft_cvae import LoraBank
from peft_cvae.file_utils import read_safetensors
from tests.distributed_worker import EPOCHS, GLOBAL_BATCH, train

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_two_processes_match_one_process_with_the_same_global_batch(bank, tmp_path, fresh_accelerate_state):
    bank.save_pretrained(tmp_path / "bank")
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}  # see tests/distributed_worker.py: fork and OpenMP
    subprocess.run(
        [sys.executable, "-m", "tests.distributed_worker", str(tmp_path / "bank"), str(tmp_path)],
        cwd=REPO_ROOT,
        env=environment,
        check=True,
        timeout=600,
    )

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [info["num_processes"] for info in ranks] == [2, 2]
    assert ranks[0]["backend"] == "gloo"
    weights = [read_safetensors(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1)]
    for key in weights[0]:  # DDP keeps the replicas in lockstep
        assert torch.equal(weights[0][key], weights[1][key]), key

    AcceleratorState._reset_state(reset_partial_state=True)
    single, single_history = train(bank, batch_size=GLOBAL_BATCH)
    reference = single.state_dict()
    assert weights[0].keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(weights[0][key], value, rtol=1e-4, atol=1e-5, msg=key)
    distributed_losses = [record["loss"] for record in ranks[0]["history"]]
    assert distributed_losses == pytest.approx([record["loss"] for record in single_history], rel=1e-4)
    assert distributed_losses[-1] < distributed_losses[0]  # and it learned something

    # The 2-process run's checkpoint resumes in 1 process (same global batch) and ends at the same weights.
    assert sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "checkpoint-epoch-000004",
        "checkpoint-epoch-000008",
    ]
    AcceleratorState._reset_state(reset_partial_state=True)
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-epoch-000004"
    resumed, resumed_history = train(bank, batch_size=GLOBAL_BATCH, resume_from=checkpoint)
    assert resumed_history[:4] == ranks[0]["history"][:4]
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_functional_offset_without_a_functional_loss_trains_in_two_processes(bank, tmp_path, fresh_accelerate_state):
    """DDP refuses a parameter that gets no gradient; without a functional loss the offset is frozen for the run,
    stays at zero, and the two ranks end equal."""
    bank.save_pretrained(tmp_path / "bank")
    subprocess.run(
        [sys.executable, "-m", "tests.distributed_worker", str(tmp_path / "bank"), str(tmp_path), "offset"],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=True,
        timeout=600,
    )
    weights = [read_safetensors(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert torch.equal(weights[0]["functional_offset"], torch.zeros_like(weights[0]["functional_offset"]))
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_the_functional_loss_and_offset_train_in_two_processes_as_in_one(tmp_path, fresh_accelerate_state):
    """The functional path (task memory with holdout, the offset at its own rate, the loss on what generation
    writes) in two processes: the ranks stay equal, the offset moves, and the weights match one process trained on
    the same global batch (each sample's examples and holdout come from its row in the global batch)."""
    from tests.distributed_worker import functional_base, train_functional
    from tests.test_functional_loss import build_setup

    base, _, full = build_setup()
    bank = LoraBank(full.layout)  # 8 of the 9 checkpoints: whole global batches of 4, no padding
    for checkpoint in full.checkpoints[:8]:
        bank.add_checkpoint(checkpoint.task, checkpoint.state_dict, step=checkpoint.step)
    for task in bank.task_names:
        bank.set_condition(task, full.condition(task))
    bank.save_pretrained(tmp_path / "bank")
    base.save_pretrained(tmp_path / "base")
    subprocess.run(
        [sys.executable, "-m", "tests.distributed_worker", str(tmp_path / "bank"), str(tmp_path), "functional",
         str(tmp_path / "base")],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=True,
        timeout=600,
    )  # fmt: skip
    weights = [read_safetensors(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1)]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    assert weights[0]["functional_offset"].abs().max() > 1e-3

    AcceleratorState._reset_state(reset_partial_state=True)
    single, single_history = train_functional(bank, *functional_base(tmp_path / "base"), batch_size=GLOBAL_BATCH)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(weights[0][key], value, rtol=1e-4, atol=1e-5, msg=key)
    history = json.loads((tmp_path / "rank0.json").read_text())["history"]
    functional = [record["functional_loss"] for record in history]
    assert functional == pytest.approx([record["functional_loss"] for record in single_history], rel=1e-4)
    assert functional[-1] < functional[0]


def test_same_seed_gives_bit_identical_weights_in_one_process(bank, fresh_accelerate_state):
    first, first_history = train(bank, batch_size=GLOBAL_BATCH)
    second, second_history = train(bank, batch_size=GLOBAL_BATCH)
    assert first_history == second_history
    for (key, value), other in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(value, other), key


def test_bf16_mixed_precision_on_cpu_stays_finite(bank, fresh_accelerate_state):
    generator, history = train(bank, batch_size=GLOBAL_BATCH, mixed_precision="bf16")
    assert all(math.isfinite(record[key]) for record in history for key in ("loss", "reconstruction_loss", "kl_loss"))
    assert history[-1]["loss"] < history[0]["loss"]
    assert all(parameter.dtype == torch.float32 for parameter in generator.parameters())  # autocast, fp32 master
    assert not hasattr(generator, "_original_forward")  # the autocast wrapper was taken off after training
    adapter = generator.generate_adapter("ascending", seed=0)
    assert all(torch.isfinite(tensor).all() for tensor in adapter.state_dict.values())


def test_gradient_accumulation_trains_and_steps_the_schedule_per_optimizer_step(bank, fresh_accelerate_state):
    _, history = train(bank, batch_size=GLOBAL_BATCH // 2, gradient_accumulation_steps=2, warmup_ratio=0.0)
    assert history[-1]["loss"] < history[0]["loss"]
    # 6 micro-batches per epoch = 3 optimizer steps; cosine over 8 * 3 steps ends at 0 exactly at the last step.
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert history[EPOCHS // 2 - 1]["lr"] == pytest.approx(3e-3 * 0.5, rel=1e-6)


def test_tensorboard_tracker_logs_every_epoch(bank, tmp_path, fresh_accelerate_state):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, history = train(bank, batch_size=GLOBAL_BATCH, log_with="tensorboard", project_dir=tmp_path)
    event_files = list(tmp_path.rglob("events.out.tfevents.*"))
    assert event_files
    events = EventAccumulator(str(event_files[0].parent))
    events.Reload()
    logged = events.Scalars("loss")
    assert [event.step for event in logged] == list(range(1, EPOCHS + 1))
    assert [event.value for event in logged] == pytest.approx([record["loss"] for record in history], rel=1e-6)


@pytest.mark.parametrize(
    ("name", "kind"),
    [("multi_gpu.yaml", "MULTI_GPU"), ("deepspeed_zero2.yaml", "DEEPSPEED"), ("fsdp.yaml", "FSDP")],
)
def test_documented_accelerate_configs_parse(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(REPO_ROOT / "docs" / "accelerate_configs" / name)
    assert config.distributed_type.value == kind
    assert config.mixed_precision == "bf16" and config.num_processes > 1
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 2
    if kind == "FSDP":  # the shard unit must be a module class of the generator
        from peft_cvae.modeling_peft_cvae import PeftCVAEGenerator

        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] in PeftCVAEGenerator._no_split_modules
    assert f'--8<-- "docs/accelerate_configs/{name}"' in (REPO_ROOT / "docs" / "distributed.md").read_text()
