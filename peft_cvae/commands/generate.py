"""`peft-cvae generate`: write a generated LoRA adapter for a training task, a description or example texts."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..task_data import read_text_file
from .utils import CLIError, add_command, dataclass_from, existing_path, load_base_model, model_path


@dataclass
class GenerateArguments:
    """What to generate and where to write it (the task itself is one of --task, --description, --examples)."""

    output: str = field(metadata={"help": "adapter folder to write (sample-NN subfolders if several)"})
    base_model: str | None = field(
        default=None, metadata={"help": "base model for --examples (default: the recorded one)"}
    )
    num_samples: int = field(default=1, metadata={"help": "adapters to draw"})
    seed: int = field(default=0, metadata={"help": "latent noise seed"})
    temperature: float = field(default=1.0, metadata={"help": "z ~ N(0, T^2 I); 0 decodes the mean"})

    def __post_init__(self):
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise CLIError(f"--num-samples must be a positive integer, got {self.num_samples!r}.")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
            raise CLIError(f"--temperature must be a finite number >= 0, got {self.temperature!r}.")


def register(commands) -> None:
    parser = add_command(
        commands,
        "generate",
        [GenerateArguments],
        help="write a generated LoRA adapter for a task",
        description="Generate a PEFT LoRA adapter from a trained generator, for a training task (--task), a new task "
        "described in words (--description) or given by a few example texts (--examples).",
    )
    parser.add_argument("generator", help="generator folder (or Hub repo id)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="name of a training task")
    which.add_argument("--description", help="a description of the task (generators trained on text conditions)")
    which.add_argument(
        "--examples",
        help="a text file with one example per line, or a JSON list (generators trained on in-context conditions)",
    )
    parser.set_defaults(handler=run)


def read_examples(path: Path) -> list[str]:
    """Example texts: a JSON list of strings, or a text file with one example per non-empty line."""
    text = read_text_file(path)
    if path.suffix == ".json":
        try:
            examples = json.loads(text)
        except json.JSONDecodeError as error:
            raise CLIError(f"The examples file {path} is not valid JSON: {error}.") from error
        if not isinstance(examples, list) or not all(isinstance(example, str) for example in examples):
            raise CLIError(f"The examples file {path} must hold a JSON list of strings.")
    else:
        examples = text.splitlines()
    examples = [example.strip() for example in examples if example.strip()]
    if not examples:
        raise CLIError(f"The examples file {path} holds no example text.")
    return examples


def _condition(namespace, generator) -> dict:
    """The task arguments of generate_adapter: a training task's name, a description, or example texts with the
    encoder to embed them with. Texts are passed as text (not as encoded vectors) so the adapter records them."""
    from ..errors import UnknownTaskError
    from ..task_encoding import load_task_encoder

    names = generator.config.task_names
    if namespace.task is not None:
        if namespace.task not in names:
            raise UnknownTaskError(
                f"Unknown task {namespace.task!r}; this generator was trained on {names}. Pass one of those, or "
                "describe a new task with --description / --examples."
            )
        return {"task": namespace.task}
    spec = generator.config.condition_encoder
    if not spec:
        raise CLIError(
            "This generator does not record which encoder made its task vectors, so a description or examples cannot "
            f"be encoded. Use --task with one of {names}."
        )
    kind = spec.get("kind")
    if namespace.description is not None and kind != "text":
        raise CLIError(
            f"This generator was trained on {kind} task vectors (in-context examples), not on descriptions. Pass "
            "--examples FILE with a few texts of the task."
        )
    if namespace.examples is not None and kind != "hidden_state":
        raise CLIError(
            f"This generator was trained on {kind} task vectors (descriptions), not on in-context examples. Pass "
            "--description TEXT."
        )
    if namespace.description is not None:
        return {"task": namespace.description, "task_encoder": load_task_encoder(spec)}
    examples = read_examples(existing_path(namespace.examples, "examples file"))
    base_model = tokenizer = None
    if namespace.base_model:
        base_model, tokenizer = load_base_model(namespace.base_model)
    return {"examples": examples, "task_encoder": load_task_encoder(spec, base_model=base_model, tokenizer=tokenizer)}


def neighbour_lines(generator, neighbours: list[dict], *, known_task: bool) -> list[str]:
    """How the condition relates to the bank: the nearest training tasks, their cosine similarity and (task memory)
    their share of the adapter, and a warning line when none is close (see `low_similarity_threshold`)."""
    if not neighbours:
        return []
    lines = [
        f"Nearest training tasks ({generator.similarity_name} similarity"
        + (", task-memory weight):" if "memory_weight" in neighbours[0] else "):")
    ]
    for entry in neighbours:
        weight = f", weight {entry['memory_weight']:.3f}" if "memory_weight" in entry else ""
        lines.append(f"  {entry['task']}: similarity {entry['similarity']:.3f}{weight}")
    threshold = generator.low_similarity_threshold()
    if not known_task and neighbours[0]["similarity"] < threshold:
        lines.append(
            f"Warning: nothing in the bank is close to this task (best similarity {neighbours[0]['similarity']:.3f} < "
            f"{threshold:.3f}, the smallest between two training tasks); expect an adapter near the bank's average."
        )
    return lines


def run(namespace) -> int:
    from ..modeling_peft_cvae import PeftCVAEGenerator

    args = dataclass_from(namespace, GenerateArguments)
    generator = PeftCVAEGenerator.from_pretrained(model_path(namespace.generator)).eval()  # a folder or a Hub repo id
    adapters = generator.generate_adapter(
        **_condition(namespace, generator), num_samples=args.num_samples, seed=args.seed, temperature=args.temperature
    )
    adapters = adapters if isinstance(adapters, list) else [adapters]
    for line in neighbour_lines(generator, adapters[0].neighbours, known_task=adapters[0].task is not None):
        print(line)
    output = Path(args.output)
    folders = [output] if len(adapters) == 1 else [output / f"sample-{index:02d}" for index in range(len(adapters))]
    for adapter, folder in zip(adapters, folders):
        adapter.save_pretrained(folder)
        print(f"Wrote a PEFT LoRA adapter to {folder}")
    return 0
