"""Plots of what a generator learns from and what it makes: task vectors or checkpoints in 2-D (ICM-LoRA's Fig. 2),
generated LoRAs beside the real checkpoints of each task, and the training loss curve.

Both functions write a PNG with matplotlib's non-interactive Agg backend, so they work on machines without a display.
matplotlib is an optional dependency (`pip install "peft-cvae[plots]"`); t-SNE uses scikit-learn when it is installed
and falls back to PCA (computed in torch) when it is not, or when there are too few points for t-SNE to mean anything.

Example:
    ```python
    from peft_cvae import LoraBank
    from peft_cvae.plotting import plot_task_vectors, plot_training_loss

    bank = LoraBank.from_pretrained("my-bank")
    plot_task_vectors(bank, "checkpoints.png")  # one point per checkpoint, coloured by task
    plot_training_loss(history, "loss.png")  # history as returned by train_generator
    plot_generated_and_real(generated, real, "generated.png")  # {task: (n, N) flat LoRAs} each, one projection
    ```
"""

import logging
import os
from pathlib import Path

import torch

from .data import LoraBank
from .errors import MissingExtraError
from .import_utils import is_sklearn_available, require_plots

__all__ = [
    "MissingExtraError",
    "plot_generated_and_real",
    "plot_task_vectors",
    "plot_training_loss",
    "project_2d",
    "project_together",
]

logger = logging.getLogger(__name__)

MIN_TSNE_POINTS = 5  # below this, t-SNE's neighbourhoods are meaningless; PCA shows the same points faithfully


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or `MissingExtraError` naming the plots extra."""
    require_plots()
    import matplotlib.pyplot as plt  # an optional dependency, imported only when a plot is drawn

    return plt


def _as_points(vectors) -> tuple[torch.Tensor, list[str], str]:
    """(points (M, D), the task of each point, a description of what the points are) from a dict or a bank."""
    if isinstance(vectors, LoraBank):
        if len(vectors) == 0:
            raise ValueError("The bank has no checkpoints to plot.")
        points = torch.stack([vectors.layout.flatten(checkpoint.state_dict) for checkpoint in vectors])  # (K, N)
        return points.float(), [checkpoint.task for checkpoint in vectors], "LoRA checkpoints (flattened weights)"
    if not isinstance(vectors, dict) or not vectors:
        raise TypeError(
            "plot_task_vectors takes a LoraBank or a non-empty dict {task name: tensor of shape (dim,) or (n, dim)}, "
            f"got {type(vectors).__name__}."
        )
    rows, labels = [], []
    for task, tensor in vectors.items():
        tensor = torch.as_tensor(tensor).detach().float().cpu()
        tensor = tensor.reshape(1, -1) if tensor.dim() == 1 else tensor.reshape(tensor.shape[0], -1)
        rows.append(tensor)
        labels.extend([str(task)] * tensor.shape[0])
    sizes = {row.shape[1] for row in rows}
    if len(sizes) != 1:
        raise ValueError(f"All task vectors must have the same length, got lengths {sorted(sizes)}.")
    return torch.cat(rows), labels, "task vectors"


def project_2d(points: torch.Tensor, method: str = "tsne", seed: int = 0) -> tuple[torch.Tensor, str]:
    """Project points (M, D) to (M, 2) and say which method was used ("t-SNE" or "PCA").

    `method="tsne"` uses scikit-learn's TSNE when it is installed and there are at least 5 points; otherwise PCA.
    """
    if method not in ("tsne", "pca"):
        raise ValueError(f"method must be 'tsne' or 'pca', got {method!r}.")
    points = points.double()
    count = points.shape[0]
    if method == "tsne" and count >= MIN_TSNE_POINTS and is_sklearn_available():
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (count - 1) / 3)  # t-SNE needs perplexity < number of points
        embedded = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
            points.numpy()
        )
        return torch.from_numpy(embedded), "t-SNE"
    if method == "tsne":
        why = "too few points" if count < MIN_TSNE_POINTS else "scikit-learn is not installed"
        logger.warning("Using PCA instead of t-SNE (%s).", why)
    centred = points - points.mean(dim=0)
    if count < 2:
        return torch.zeros(count, 2, dtype=points.dtype), "PCA"
    _, _, right = torch.linalg.svd(centred, full_matrices=False)  # right: (min(M, D), D), rows = principal axes
    projected = centred @ right[:2].T  # (M, <=2)
    if projected.shape[1] < 2:
        projected = torch.cat([projected, projected.new_zeros(count, 2 - projected.shape[1])], dim=1)
    return projected, "PCA"


def plot_task_vectors(
    vectors, path: str | os.PathLike, method: str = "tsne", title: str | None = None, seed: int = 0
) -> Path:
    """Scatter task vectors (or LoRA checkpoints) in 2-D, coloured by task, and save the figure as a PNG.

    Args:
        vectors: `{task: tensor of shape (dim,) or (n, dim)}` (e.g. conditions, or several in-context task vectors per
            task), or a `LoraBank`, whose checkpoints are plotted one point each (flattened LoRA weights).
        path: where to write the PNG (parent folders are created).
        method: `"tsne"` (scikit-learn; PCA when it is missing or for fewer than 5 points) or `"pca"`.
        title: the figure title (the projection used is appended); by default it says what was plotted and how.
        seed: random state of t-SNE.

    Returns:
        The path of the PNG.

    Raises:
        MissingExtraError: matplotlib is not installed (`pip install "peft-cvae[plots]"`).
    """
    plt = _pyplot()
    points, labels, what = _as_points(vectors)
    projected, used = project_2d(points, method, seed)
    figure, axes = plt.subplots(figsize=(6, 5), dpi=100)
    colours = plt.get_cmap("tab10")
    for index, task in enumerate(dict.fromkeys(labels)):
        rows = [row for row, label in enumerate(labels) if label == task]
        axes.scatter(projected[rows, 0], projected[rows, 1], s=40, color=colours(index % 10), label=task)
    axes.set_xlabel(f"{used} 1")
    axes.set_ylabel(f"{used} 2")
    axes.set_title(f"{title} ({used})" if title else f"{what}: {used}, coloured by task")
    axes.legend(loc="best", fontsize="small")
    return _save(figure, path, plt)


def project_together(
    groups: dict[str, dict[str, torch.Tensor]], method: str = "tsne", seed: int = 0
) -> tuple[dict[str, dict[str, torch.Tensor]], str]:
    """Project several groups of points (e.g. `{"real": {task: (n, D)}, "generated": {task: (m, D)}}`) with ONE 2-D
    projection fitted on all of them, so a generated LoRA and a real checkpoint at the same place are the same LoRA.

    Returns:
        `({group: {task: (n, 2)}}, the method used)`.
    """
    rows, index = [], []
    for group, vectors in groups.items():
        for task, tensor in vectors.items():
            tensor = torch.as_tensor(tensor).detach().float().cpu()
            tensor = tensor.reshape(1, -1) if tensor.dim() == 1 else tensor.reshape(tensor.shape[0], -1)
            index.append((group, task, len(tensor)))
            rows.append(tensor)
    if not rows:
        raise ValueError("Nothing to project: every group is empty.")
    sizes = {row.shape[1] for row in rows}
    if len(sizes) != 1:
        raise ValueError(f"All points must have the same length, got lengths {sorted(sizes)}.")
    projected, used = project_2d(torch.cat(rows), method, seed)  # (M, 2)
    result: dict[str, dict[str, torch.Tensor]] = {group: {} for group in groups}
    start = 0
    for group, task, count in index:
        result[group][task] = projected[start : start + count]
        start += count
    return result, used


def plot_generated_and_real(
    generated: dict, real: dict, path: str | os.PathLike, method: str = "tsne", title: str | None = None, seed: int = 0
) -> Path:
    """Scatter generated LoRAs (crosses) beside the real checkpoints of the same tasks (dots), in one 2-D projection
    fitted on both, coloured by task, and save a PNG.

    Generated samples that fall on one point while the real checkpoints spread show a decoder that ignores its latent;
    samples far from their own task's checkpoints show a generator that does not reproduce the task.

    Args:
        generated: `{task: tensor (m, N)}` of flattened generated LoRAs (`layout.flatten(adapter.state_dict)`).
        real: `{task: tensor (n, N)}` of flattened bank checkpoints (e.g. `bank.checkpoints_of(task)`).
        path: where to write the PNG.
        method: `"tsne"` or `"pca"` (as `plot_task_vectors`).
        title: the figure title (the projection used is appended).
        seed: random state of t-SNE.
    """
    plt = _pyplot()
    projected, used = project_together({"real": real, "generated": generated}, method, seed)
    figure, axes = plt.subplots(figsize=(6.5, 5), dpi=100)
    colours = plt.get_cmap("tab10")
    for number, task in enumerate(dict.fromkeys([*real, *generated])):
        colour = colours(number % 10)
        if task in projected["real"]:
            points = projected["real"][task]
            axes.scatter(points[:, 0], points[:, 1], s=30, color=colour, alpha=0.45, label=f"{task}: real")
        if task in projected["generated"]:
            points = projected["generated"][task]
            axes.scatter(points[:, 0], points[:, 1], s=70, color=colour, marker="x", label=f"{task}: generated")
    axes.set_xlabel(f"{used} 1")
    axes.set_ylabel(f"{used} 2")
    axes.set_title(f"{title} ({used})" if title else f"Generated (x) and real (o) LoRAs: {used}, coloured by task")
    axes.legend(loc="best", fontsize="x-small")
    return _save(figure, path, plt)


def plot_training_loss(history: list[dict], path: str | os.PathLike, title: str = "Generator training loss") -> Path:
    """Plot the losses of `train_generator`'s history (one record per epoch) on a log scale and save a PNG.

    Args:
        history: `[{"epoch": 1, "loss": ..., "reconstruction_loss": ..., "kl_loss": ...}, ...]`; records without a
            key are skipped for that curve.
        path: where to write the PNG.

    Raises:
        MissingExtraError: matplotlib is not installed.
    """
    if not isinstance(history, list) or not history or not all(isinstance(record, dict) for record in history):
        raise ValueError("history must be a non-empty list of per-epoch dicts, as returned by train_generator.")
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    for key, label in (("loss", "total"), ("reconstruction_loss", "reconstruction"), ("kl_loss", "KL")):
        records = [record for record in history if isinstance(record.get(key), (int, float))]
        if records:
            epochs = [record.get("epoch", index + 1) for index, record in enumerate(records)]
            values = [max(float(record[key]), 1e-12) for record in records]  # log scale: no zeros
            axes.plot(epochs, values, label=label)
    axes.set_yscale("log")
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.legend(loc="best")
    return _save(figure, path, plt)


def _save(figure, path, plt) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        figure.tight_layout()
        figure.savefig(temporary, format="png")
        os.replace(temporary, path)  # atomic: a reader never sees half a PNG
    finally:
        plt.close(figure)
        temporary.unlink(missing_ok=True)
    return path
