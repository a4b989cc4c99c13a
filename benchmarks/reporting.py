"""Writing a benchmark's report: where it ran, with which libraries, tables, uncertainty, and the markdown page with
its plots. Shared by every benchmark entry, so that their pages read alike."""

import os
import platform
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from peft_cvae.file_utils import atomic_directory

__all__ = ["bootstrap_interval", "library_versions", "machine_description", "markdown_table", "publish_report"]


def machine_description(device: torch.device) -> str:
    """One line on the hardware the numbers come from (timings depend on it)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {platform.platform()}"
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, shared), {platform.platform()}"


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose code the numbers depend on."""
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table (no trailing newline); cells are written with `str`."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def bootstrap_interval(
    values: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (e.g. per-example scores): resample with replacement
    `resamples` times and take the central `confidence` share of the resampled means. Seeded, so a report
    regenerated from the same values gives the same interval."""
    if not values:
        raise ValueError("bootstrap_interval needs at least one value.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    rng = random.Random(seed)
    count = len(values)
    means = sorted(sum(rng.choices(values, k=count)) / count for _ in range(resamples))
    tail = (1 - confidence) / 2
    return means[int(tail * (resamples - 1))], means[int(round((1 - tail) * (resamples - 1)))]


def publish_report(report: Path, images: Sequence[Path], render: Callable[[list[str]], str]) -> str:
    """Write the markdown `render(links)` to `report`, atomically with its images; return the text.

    When the report goes to another folder than its images (e.g. `docs/`, whose site must hold them), the images are
    copied into `images/` next to it and linked from there; otherwise they are linked by name.
    """
    images = list(images)
    with atomic_directory(report.parent) as staging:
        if images and report.parent.resolve() != images[0].parent.resolve():
            (staging / "images").mkdir()
            for image in images:
                (staging / "images" / image.name).write_bytes(image.read_bytes())
            links = [f"images/{image.name}" for image in images]
        else:
            links = [image.name for image in images]
        text = render(links)
        (staging / report.name).write_text(text, encoding="utf-8")
    return text
