"""Two-process CPU training for tests/test_distributed.py, started in a fresh interpreter.

`accelerate.debug_launcher` forks. GNU OpenMP's thread pool does not survive `fork()`: a child that runs a
multi-threaded kernel after its parent already did hangs in `gomp_team_barrier_wait`. The pytest process has long
used several threads (the session's bank fixture), so the test runs this script with `OMP_NUM_THREADS=1` instead;
the parent of the fork then never starts an OpenMP pool.

Usage: python -m tests.distributed_worker BANK_DIR OUT_DIR [offset]

`offset`: the generator has a functional offset (`PeftCVAEConfig.functional_offset`) and no functional loss trains
it, a parameter without a gradient, which data-parallel training must be told about.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState, debug_launcher

from peft_cvae import LoraBank, PeftCVAEGenerator, train_generator
from peft_cvae.file_utils import write_safetensors
from tests.testing_utils import small_generator_overrides

EPOCHS = 8
GLOBAL_BATCH = 4  # the test bank has 12 checkpoints: 3 global batches per epoch, no padding


def train(bank, functional_offset: bool = False, **kwargs):
    """The run both sides of the comparison make: same generator init, same seed, same global batch."""
    torch.manual_seed(0)
    # The plain decoder: the tests check that training learns something (the loss falls within 8 epochs), which
    # task memory, from_bank's default, makes moot (its task means explain the checkpoints from the start).
    overrides = {**small_generator_overrides(), "functional_offset": functional_offset}
    generator = PeftCVAEGenerator.from_bank(bank, task_memory=False, **overrides)
    history = train_generator(generator, bank, epochs=EPOCHS, lr=3e-3, show_progress=False, **kwargs)
    return generator, history


def train_on_each_rank(bank, out_dir: Path, functional_offset: bool = False) -> None:
    """Runs in every forked process: train with half the global batch, write this rank's weights and history.

    The main process also writes a resumable checkpoint at epoch 4 and the final generator under OUT_DIR/run.
    """
    generator, history = train(
        bank, functional_offset, batch_size=GLOBAL_BATCH // 2, output_dir=out_dir / "run", checkpoint_every=4
    )
    state = PartialState()
    write_safetensors(generator.state_dict(), out_dir / f"rank{state.process_index}.safetensors")
    info = {"num_processes": state.num_processes, "backend": state.backend, "history": history}
    (out_dir / f"rank{state.process_index}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    torch.set_num_threads(1)
    bank_dir, out_dir = (Path(argument) for argument in sys.argv[1:3])
    offset = sys.argv[3:] == ["offset"]
    debug_launcher(train_on_each_rank, args=(LoraBank.from_pretrained(bank_dir), out_dir, offset), num_processes=2)
