"""Training a benchmark's generator with its preset's settings, timed: shared by every benchmark entry, so that the
generators they compare are trained the same way."""

import time

from peft_cvae import train_generator

__all__ = ["train_timed"]


def train_timed(generator, bank, settings, seed: int) -> tuple[list[dict], float]:
    """Train `generator` on `bank` for the preset's `generator_epochs` at `generator_lr` and `generator_batch_size`;
    return the per-epoch history and the seconds it took."""
    start = time.perf_counter()
    history = train_generator(
        generator,
        bank,
        epochs=settings.generator_epochs,
        lr=settings.generator_lr,
        batch_size=settings.generator_batch_size,
        seed=seed,
    )
    return history, time.perf_counter() - start
