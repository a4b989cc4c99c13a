"""`peft-cvae plot`: PNG figures of a bank's checkpoints or a generator's training and samples."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..task_data import read_text_file
from ..training import HISTORY_NAME as GENERATOR_HISTORY_NAME
from .info import bank_conditions
from .utils import CLIError, add_command, dataclass_from, existing_path


@dataclass
class PlotArguments:
    """Where the figures go and how the points are projected."""

    output: str = field(metadata={"help": "folder for the PNG files"})
    method: str = field(default="tsne", metadata={"help": "2-D projection", "choices": ["tsne", "pca"]})
    samples: int = field(default=8, metadata={"help": "generated LoRAs per task"})
    seed: int = field(default=0, metadata={"help": "seed of the generated samples"})
    bank: str | None = field(
        default=None,
        metadata={
            "help": "for a generator: the bank it was trained on, whose checkpoints are drawn beside the samples"
        },
    )

    def __post_init__(self):
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise CLIError(f"--samples must be a positive integer, got {self.samples!r}.")


def register(commands) -> None:
    parser = add_command(
        commands,
        "plot",
        [PlotArguments],
        help="draw PNG figures of a bank or generator",
        description="For a bank: its checkpoints and task vectors in 2-D, coloured by task (ICM-LoRA Fig. 2). For a "
        "generator: its training loss and generated LoRAs in 2-D, with --bank beside the real checkpoints of each "
        "task (one projection fitted on both).",
    )
    parser.add_argument("path", help="bank or generator folder")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..data import BANK_MANIFEST_NAME, LoraBank
    from ..plotting import plot_generated_and_real, plot_task_vectors, plot_training_loss

    dataclass_from(args, PlotArguments)  # checks the options
    path = existing_path(args.path, "folder")
    output = Path(args.output)
    written = []
    if (path / BANK_MANIFEST_NAME).is_file():
        bank = LoraBank.from_pretrained(path)
        written.append(plot_task_vectors(bank, output / "checkpoints.png", method=args.method))
        conditions = bank_conditions(bank)
        if conditions:
            written.append(plot_task_vectors(conditions, output / "task_vectors.png", method=args.method))
    elif (path / "config.json").is_file():
        from ..modeling_peft_cvae import PeftCVAEGenerator

        generator = PeftCVAEGenerator.from_pretrained(str(path)).eval()
        history_file = path / GENERATOR_HISTORY_NAME
        if history_file.is_file():
            written.append(
                plot_training_loss(json.loads(read_text_file(history_file))["history"], output / "training_loss.png")
            )
        samples = {}
        for task in generator.config.task_names:
            adapters = generator.generate_adapter(task, num_samples=args.samples, seed=args.seed)
            adapters = adapters if isinstance(adapters, list) else [adapters]
            samples[task] = torch.stack([generator.config.lora_layout.flatten(a.state_dict) for a in adapters])
        if args.bank:
            real = _bank_checkpoints(args.bank, generator)
            written.append(plot_generated_and_real(samples, real, output / "generated.png", method=args.method))
        else:
            written.append(
                plot_task_vectors(
                    samples, output / "generated.png", method=args.method, title="Generated LoRAs, coloured by task"
                )
            )
            print("Pass --bank BANK to draw the real checkpoints of each task beside the generated LoRAs.")
    else:
        raise CLIError(f"{path} is neither a LoRA bank (bank.json) nor a peft-cvae generator (config.json).")
    for file in written:
        print(f"Wrote {file}")
    return 0


def _bank_checkpoints(path: str, generator) -> dict[str, torch.Tensor]:
    """The flattened checkpoints of the generator's tasks in the bank at `path` (of the generator's layout)."""
    from ..data import LoraBank

    bank = LoraBank.from_pretrained(existing_path(path, "bank folder"))
    layout = generator.config.lora_layout
    if bank.layout.keys != layout.keys or bank.layout.shapes != layout.shapes:
        raise CLIError(
            f"The bank {path} holds LoRAs of another layout (base model, rank or target modules) than the generator; "
            "pass the bank the generator was trained on."
        )
    tasks = [task for task in generator.config.task_names if task in bank.task_names]
    if not tasks:
        raise CLIError(
            f"The bank {path} has none of the generator's tasks ({', '.join(generator.config.task_names)})."
        )
    return {task: torch.stack([layout.flatten(c.state_dict) for c in bank.checkpoints_of(task)]) for task in tasks}
