"""Two-process CPU training for tests/test_distributed.py, started in a fresh interpreter.

`accelerate.debug_launcher` forks. GNU OpenMP's thread pool does not survive `fork()`: a child that runs a
multi-threaded kernel after its parent already did hangs in `gomp_team_barrier_wait`. The pytest process has long
used several threads (the session's bank fixture), so the test runs this script with `OMP_NUM_THREADS=1` instead;
the parent of the fork then never starts an OpenMP pool.

Usage: python -m tests.distributed_worker BANK_DIR OUT_DIR [offset | functional BASE_DIR]

`offset`: the generator has a functional offset (`PeftCVAEConfig.functional_offset`) and no functional loss trains
it, a parameter without a gradient, which data-parallel training must be told about.
`functional BASE_DIR`: a generator with task memory, memory holdout and a functional offset, trained with the
functional loss on what generation writes (`FunctionalLoss(on_generated=True, offset_lr=...)`) over the base model
saved in BASE_DIR and the tasks of tests/test_functional_loss.py.
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


def train_functional(bank, base, tokenizer, **kwargs):
    """The functional run both sides make: the bank's tasks scored on the frozen base model, the offset at its own
    rate, each sample's examples and memory holdout drawn from its row in the global batch (not from the rank)."""
    from peft_cvae.functional_loss import FunctionalLoss
    from tests.test_functional_loss import GENERATOR, TASKS

    torch.manual_seed(0)
    generator = PeftCVAEGenerator.from_bank(bank, memory_holdout=0.5, functional_offset=True, **GENERATOR)
    loss = FunctionalLoss(
        base, tokenizer, TASKS, bank.layout, examples_per_task=2, max_length=24, on_generated=True, offset_lr=3e-2
    )
    history = train_generator(generator, bank, functional_loss=loss, epochs=4, lr=1e-2, show_progress=False, **kwargs)
    return generator, history


def functional_base(base_dir: Path):
    """(base model, tokenizer) as tests/test_functional_loss.py builds them, the model's weights read back."""
    from transformers import AutoModelForCausalLM

    from peft_cvae.testing_utils import tiny_bpe_tokenizer
    from tests.test_functional_loss import CORPUS

    return AutoModelForCausalLM.from_pretrained(base_dir), tiny_bpe_tokenizer(CORPUS)


def train_functional_on_each_rank(bank, out_dir: Path, base_dir: Path) -> None:
    """Runs in every forked process: the functional run with half the global batch; this rank's weights and
    history."""
    generator, history = train_functional(bank, *functional_base(base_dir), batch_size=GLOBAL_BATCH // 2)
    write_rank(generator, history, out_dir)


def write_rank(generator, history: list[dict], out_dir: Path) -> None:
    """This rank's weights (OUT_DIR/rankR.safetensors) and its process count, backend and history (rankR.json)."""
    state = PartialState()
    write_safetensors(generator.state_dict(), out_dir / f"rank{state.process_index}.safetensors")
    info = {"num_processes": state.num_processes, "backend": state.backend, "history": history}
    (out_dir / f"rank{state.process_index}.json").write_text(json.dumps(info))


def train_on_each_rank(bank, out_dir: Path, functional_offset: bool = False) -> None:
    """Runs in every forked process: train with half the global batch, write this rank's weights and history.

    The main process also writes a resumable checkpoint at epoch 4 and the final generator under OUT_DIR/run.
    """
    generator, history = train(
        bank, functional_offset, batch_size=GLOBAL_BATCH // 2, output_dir=out_dir / "run", checkpoint_every=4
    )
    write_rank(generator, history, out_dir)


if __name__ == "__main__":
    torch.set_num_threads(1)
    bank_dir, out_dir = (Path(argument) for argument in sys.argv[1:3])
    bank = LoraBank.from_pretrained(bank_dir)
    if sys.argv[3:4] == ["functional"]:
        debug_launcher(train_functional_on_each_rank, args=(bank, out_dir, Path(sys.argv[4])), num_processes=2)
    else:
        offset = sys.argv[3:] == ["offset"]
        debug_launcher(train_on_each_rank, args=(bank, out_dir, offset), num_processes=2)
