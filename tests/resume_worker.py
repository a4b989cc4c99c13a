"""One training run for tests/test_resume.py, in a process of its own so that the test can SIGKILL it.

Usage: python -m tests.resume_worker BANK_DIR OUTPUT_DIR [--resume] [--seconds-per-epoch S] [--adapter-dir DIR]

Prints one JSON line first: the checkpoint it resumes from (null for a fresh start).
"""

import argparse
import json
import time

import torch
from accelerate.tracking import GeneralTracker

from peft_cvae import LoraBank, PeftCVAEGenerator, train_generator
from peft_cvae.training import latest_checkpoint
from tests.testing_utils import small_generator_overrides

EPOCHS = 10
TRAINING = {"epochs": EPOCHS, "lr": 3e-3, "batch_size": 4, "seed": 0, "show_progress": False}


class PauseTracker(GeneralTracker):
    """A tracker that only waits after each epoch's log call, so that the test has time to kill the run mid-way.

    It reads nothing and changes nothing of the training state, so timing cannot affect the weights.
    """

    name = "pause"
    requires_logging_directory = False

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    @property
    def tracker(self):
        return None

    def store_init_configuration(self, values: dict) -> None:
        pass

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        time.sleep(self.seconds)


def new_generator(bank, init_seed: int = 0) -> PeftCVAEGenerator:
    torch.manual_seed(init_seed)
    return PeftCVAEGenerator.from_bank(bank, **small_generator_overrides())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bank_dir", help="a LoraBank folder")
    parser.add_argument("output_dir", help="checkpoints go to OUTPUT_DIR/checkpoints, the generator to OUTPUT_DIR")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--seconds-per-epoch", type=float, default=0.0, help="pause after every epoch")
    parser.add_argument("--adapter-dir", help="afterwards, write generate_adapter('ascending', seed=7) here")
    args = parser.parse_args()

    bank = LoraBank.from_pretrained(args.bank_dir)
    resume_from = latest_checkpoint(args.output_dir) if args.resume else None
    print(json.dumps({"resume_from": str(resume_from) if resume_from else None}), flush=True)
    generator = new_generator(bank, init_seed=1 if args.resume else 0)  # resuming must not need the same init
    train_generator(
        generator,
        bank,
        output_dir=args.output_dir,
        checkpoint_every=1,
        resume_from="latest" if args.resume else None,
        log_with=[PauseTracker(args.seconds_per_epoch)] if args.seconds_per_epoch else None,
        **TRAINING,
    )
    if args.adapter_dir:
        generator.generate_adapter("ascending", seed=7).save_pretrained(args.adapter_dir)


if __name__ == "__main__":
    main()
