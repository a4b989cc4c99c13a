"""The report's PNG plots: perplexity by method, task vectors, and LoRA vectors (checkpoints and generated)."""

from pathlib import Path

import torch

from peft_cvae import LoraBank

from .report import _short


def plots(results: dict, bank: LoraBank, generated: dict, prefix: Path) -> list[Path]:
    """Per-domain perplexity (relative to the original LoRA) by method; task vectors; LoRA vectors."""
    try:
        from peft_cvae.plotting import _pyplot, plot_task_vectors
    except ImportError:
        return []
    plt = _pyplot()
    written = []
    domains = list(results["seen"])
    methods = [m for m in next(iter(results["seen"].values())) if m != "base"]
    figure, axis = plt.subplots(figsize=(max(8, 2.2 * len(domains)), 4.5))
    width = 0.85 / len(methods)
    colours = plt.get_cmap("tab20")
    for m, method in enumerate(methods):
        values = [
            results["seen"][d][method]["perplexity"] / results["seen"][d]["original LoRA"]["perplexity"]
            for d in domains
        ]
        axis.bar([i + m * width for i in range(len(domains))], values, width, label=_short(method), color=colours(m))
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_xticks([i + 0.425 - width / 2 for i in range(len(domains))], domains)
    axis.set_ylabel("held-out perplexity / original LoRA's")
    axis.set_title("Seen domains: perplexity relative to the original LoRA (lower is better)")
    axis.legend(fontsize=6, ncol=3)
    figure.tight_layout()
    written.append(prefix.with_name(prefix.name + "_perplexity.png"))
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)
    points = results["points"]
    written.append(
        plot_task_vectors(
            {d: torch.tensor(p) for d, p in points["examples"].items()},
            prefix.with_name(prefix.name + "_task_vectors.png"),
            title="In-context task vectors (one point per example text)",
        )
    )
    vectors = {}
    for checkpoint in bank:
        vectors.setdefault(checkpoint.task, []).append(bank.layout.flatten(checkpoint.state_dict))
    loras = {f"{task} checkpoints": torch.stack(v) for task, v in vectors.items()}
    loras["generated (description, z=0)"] = torch.stack(list(generated["description"].values()))
    written.append(
        plot_task_vectors(
            loras,
            prefix.with_name(prefix.name + "_loras.png"),
            method="pca",
            title="LoRA checkpoints and generated LoRAs (PCA)",
        )
    )
    return written
