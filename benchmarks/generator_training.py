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
        # The early stopping every committed result was trained with (the library's defaults until issue 16 made
        # them 10 epochs / 1 %): the cached generators are keyed without it, so it stays fixed here.
        early_stopping_patience=20,
        early_stopping_min_delta=1e-3,
    )
    return history, time.perf_counter() - start
