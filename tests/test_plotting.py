"""Plots: real PNG files from task vectors, a bank's checkpoints and a training history; a clear error without
matplotlib."""

import sys

import pytest
import torch

from peft_cvae.plotting import MissingExtraError, plot_task_vectors, plot_training_loss, project_2d

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000  # axes, points and legend, not an empty canvas
    assert not list(path.parent.glob(f".{path.name}.tmp"))


def test_plot_task_vectors_from_dict_with_tsne(tmp_path):
    generator = torch.Generator().manual_seed(0)
    centres = {"sport": torch.zeros(16), "tech": torch.full((16,), 5.0), "code": torch.full((16,), -5.0)}
    vectors = {task: centre + torch.randn(6, 16, generator=generator) for task, centre in centres.items()}
    path = plot_task_vectors(vectors, tmp_path / "plots" / "tasks.png", method="tsne")
    assert path == tmp_path / "plots" / "tasks.png"
    assert_png(path)


def test_plot_task_vectors_from_bank_with_pca(bank, tmp_path):
    path = plot_task_vectors(bank, tmp_path / "bank.png", method="pca")
    assert_png(path)


def test_pca_projection_keeps_the_main_direction():
    points = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.1, 0.0], [2.0, -0.1, 0.0], [3.0, 0.0, 0.0]])
    projected, used = project_2d(points, "pca")
    assert used == "PCA"
    assert projected.shape == (4, 2)
    # The first axis orders the points along x, the direction of largest variance.
    order = projected[:, 0].argsort()
    assert order.tolist() in ([0, 1, 2, 3], [3, 2, 1, 0])
    # Too few points for t-SNE: PCA is used instead.
    assert project_2d(points[:3], "tsne")[1] == "PCA"
    with pytest.raises(ValueError, match="tsne' or 'pca"):
        project_2d(points, "umap")


def test_plot_training_loss(trained_generator, tmp_path):
    path = plot_training_loss(trained_generator.training_history, tmp_path / "loss.png")
    assert_png(path)
    with pytest.raises(ValueError, match="non-empty list"):
        plot_training_loss([], tmp_path / "empty.png")


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(MissingExtraError, match=r"peft-cvae\[plots\]"):
        plot_task_vectors({"a": torch.zeros(4)}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_generated_and_real_share_one_projection(bank, trained_generator, tmp_path):
    from peft_cvae.plotting import plot_generated_and_real, project_together

    layout = bank.layout
    real = {
        task: torch.stack([layout.flatten(c.state_dict) for c in bank.checkpoints_of(task)])
        for task in bank.task_names
    }
    copies = {task: points[-2:].clone() for task, points in real.items()}  # "generated" = two real checkpoints
    projected, used = project_together({"real": real, "generated": copies}, method="pca")
    assert used == "PCA"
    for task, points in real.items():
        assert projected["real"][task].shape == (len(points), 2)
        torch.testing.assert_close(projected["generated"][task], projected["real"][task][-2:])  # the same place
    samples = {}
    for task in bank.task_names:
        adapters = trained_generator.generate_adapter(task, num_samples=3, seed=0)
        samples[task] = torch.stack([layout.flatten(adapter.state_dict) for adapter in adapters])
    assert_png(plot_generated_and_real(samples, real, tmp_path / "generated.png", method="tsne"))
    with pytest.raises(ValueError, match="same length"):
        project_together({"real": real, "generated": {"x": torch.zeros(2, 3)}})
