"""`peft-cvae info`: what a bank, generator or PEFT adapter folder contains."""

import json

from ..task_data import read_text_file
from ..training import HISTORY_NAME as GENERATOR_HISTORY_NAME
from .utils import CLIError, add_command, existing_path, folder_size, human_size


def register(commands) -> None:
    parser = add_command(
        commands,
        "info",
        help="show what a bank, generator or adapter contains",
        description="Print the layout, tasks, sizes and task encoder of a LoRA bank, a generator or a PEFT adapter.",
    )
    parser.add_argument("path", help="bank, generator or adapter folder")
    parser.set_defaults(handler=run)


def bank_conditions(bank) -> dict:
    """The condition vectors a bank has, by task (a bank may lack some until they are set)."""
    from ..errors import UnknownTaskError

    conditions = {}
    for task in bank.task_names:
        try:
            conditions[task] = bank.condition(task)
        except UnknownTaskError:
            continue
    return conditions


def layout_lines(layout) -> list[str]:
    config = layout.lora_config
    return [
        f"base model:      {config.get('base_model_name_or_path')}",
        f"LoRA:            r={config.get('r')}, alpha={config.get('lora_alpha')}, "
        f"targets={config.get('target_modules')}",
        f"layout:          {len(layout.keys)} tensors, {layout.numel:,} parameters ({layout.dtype})",
    ]


def run(args) -> int:
    from ..data import BANK_MANIFEST_NAME, LoraBank
    from ..layout import LoraLayout

    path = existing_path(args.path, "folder")
    if (path / BANK_MANIFEST_NAME).is_file():
        bank = LoraBank.from_pretrained(path)
        lines = [f"LoRA bank:       {path} ({human_size(folder_size(path))})", *layout_lines(bank.layout)]
        lines.append(
            f"encoder:         {json.dumps(bank.condition_encoder) if bank.condition_encoder else 'not recorded'}"
        )
        sizes = {task: condition.numel() for task, condition in bank_conditions(bank).items()}
        lines.append(
            f"conditions:      {len(sizes)} of {len(bank.task_names)} tasks, size {set(sizes.values()) or '-'}"
        )
        lines.append(f"checkpoints:     {len(bank)}")
        for task in bank.task_names:
            steps = [checkpoint.step for checkpoint in bank.checkpoints_of(task)]
            lines.append(
                f"  {task}: {len(steps)} checkpoints (steps {steps}) - {bank.description(task) or 'no description'}"
            )
    elif (path / "config.json").is_file() and json.loads(read_text_file(path / "config.json")).get(
        "model_type"
    ) == "peft_cvae":
        from ..modeling_peft_cvae import PeftCVAEGenerator

        generator = PeftCVAEGenerator.from_pretrained(str(path))
        config = generator.config
        lines = [f"generator:       {path} ({human_size(folder_size(path))})", *layout_lines(config.lora_layout)]
        lines.append(
            f"encoder:         {json.dumps(config.condition_encoder) if config.condition_encoder else 'not recorded'}"
        )
        lines.append(f"condition size:  {config.condition_size}")
        lines.append(
            f"network:         {generator.num_parameters():,} parameters; latent {config.latent_size}, "
            f"{config.hidden_channels} channels, {config.num_layers} layers, patch {config.patch_size} "
            f"({config.num_tokens} tokens)"
        )
        history_file = path / GENERATOR_HISTORY_NAME
        if history_file.is_file():
            record = json.loads(read_text_file(history_file))
            history = record.get("history") or []
            if history:
                first, last = history[0]["loss"], history[-1]["loss"]
                lines.append(f"training:        {len(history)} epochs, loss {first:.4f} -> {last:.4f}")
        lines.append(f"tasks:           {len(config.task_names)}")
        for name, description in zip(config.task_names, config.task_descriptions):
            lines.append(f"  {name}: {description or 'no description'}")
    elif (path / "adapter_config.json").is_file():
        layout = LoraLayout.from_pretrained(path)
        lines = [f"PEFT adapter:    {path} ({human_size(folder_size(path))})", *layout_lines(layout)]
    else:
        raise CLIError(
            f"{path} is not a LoRA bank (bank.json), a peft-cvae generator (config.json of model_type peft_cvae) or "
            "a PEFT adapter (adapter_config.json)."
        )
    print("\n".join(lines))
    return 0
