"""Hub model cards for generators and for the adapters they write, and the upload both use.

A pushed repo should explain itself on the Hub page: a generator's card says which base model, target modules and
rank its adapters have, which tasks (with descriptions) it knows, how its task vectors were made, how training went and
how to use it; a generated adapter's card is a PEFT-style card (`library_name: peft`, `base_model`,
`base_model:adapter:<base>` tag) that also says which generator wrote it, for which task, with which seed and
temperature. The text comes from Jinja templates shipped in `peft_cvae/templates/` (as setfit does), filled through
huggingface_hub's `ModelCard.from_template`, so the YAML header is exactly what the Hub validates.

transformers' own `push_to_hub` writes a generic card; `PeftCVAEGenerator.push_to_hub` and
`GeneratedAdapter.push_to_hub` instead save into a temporary folder, write these cards there and upload the folder in
one commit with `peft_cvae.hub.push_folder_to_hub`.
"""

import importlib.metadata
import json
import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

__all__ = [
    "GENERATOR_TAGS",
    "adapter_model_card",
    "generator_model_card",
    "hub_base_model",
    "training_summary",
]

TEMPLATES = Path(__file__).parent / "templates"
GENERATOR_TAGS = ["peft", "lora", "lora-generator", "peft-cvae"]
# PEFT task types and the Hub pipeline tag of the base model they adapt (as PEFT's own card sets for causal LMs).
PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def hub_base_model(name_or_path: str | None) -> str | None:
    """`name_or_path` if it is a Hub repo id, else None (unknown, or a local folder: not valid card metadata)."""
    if not name_or_path or os.path.exists(name_or_path):
        return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def training_summary(history: list[dict] | None) -> dict:
    """The figures a card shows from `train_generator`'s per-epoch history (an empty dict for no history).

    Returns:
        `{"epochs", "final_loss", "final_reconstruction_loss", "final_kl_loss", "initial_reconstruction_loss",
        "peak_learning_rate"}`, plain JSON numbers (losses rounded to 6 significant digits).
    """
    if not history:
        return {}
    first, last = history[0], history[-1]
    summary = {"epochs": int(last.get("epoch", len(history)))}
    for name in ("loss", "reconstruction_loss", "kl_loss"):
        if name in last:
            summary[f"final_{name}"] = float(f"{last[name]:.6g}")
    if "reconstruction_loss" in first:
        summary["initial_reconstruction_loss"] = float(f"{first['reconstruction_loss']:.6g}")
    learning_rates = [record["lr"] for record in history if "lr" in record]
    if learning_rates:
        summary["peak_learning_rate"] = float(f"{max(learning_rates):.6g}")
    return summary


def _versions() -> dict[str, str]:
    versions = {}
    for distribution in ("peft-cvae", "transformers", "peft"):
        try:
            versions[distribution.replace("-", "_") + "_version"] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[distribution.replace("-", "_") + "_version"] = "unknown"
    return versions


def _layout_fields(layout) -> dict:
    """Template values that describe the adapters of a `LoraLayout`."""
    lora = layout.lora_config
    target_modules = lora.get("target_modules")
    if isinstance(target_modules, (list, tuple)):
        target_modules = ", ".join(f"`{name}`" for name in sorted(target_modules))
    else:
        target_modules = f"`{target_modules}`"  # a regular expression
    return {
        "base_model_name": lora.get("base_model_name_or_path"),
        "base_model": hub_base_model(lora.get("base_model_name_or_path")),
        "peft_type": lora.get("peft_type", "LORA"),
        "target_modules": target_modules,
        "rank": lora.get("r"),
        "lora_alpha": lora.get("lora_alpha"),
        "task_type": lora.get("task_type"),
        "adapter_parameters": layout.numel,
        "num_tensors": len(layout.keys),
        "dtype": layout.dtype,
        "library": getattr(layout, "library", "peft"),  # "diffusers" for a diffusers UNet
    }


def generator_model_card(generator, model_id: str | None = None, tags: list[str] | None = None) -> ModelCard:
    """The Hub card of a `PeftCVAEGenerator` (YAML: `library_name: peft-cvae`, `tags`, `base_model` if on the Hub).

    Args:
        generator: the `PeftCVAEGenerator`. Training figures come from its `training_history` attribute (set it to
            `train_generator`'s return value) or, after `from_pretrained`, from `config.training_summary`.
        model_id: repo id or folder the usage snippet loads from (defaults to `config.name_or_path`).
        tags: extra Hub tags, added to `peft`, `lora`, `lora-generator`, `peft-cvae`.
    """
    config = generator.config
    layout = config.lora_layout
    fields = _layout_fields(layout)
    model_id = model_id or config.name_or_path or "path/to/generator"
    card_data = ModelCardData(
        library_name="peft-cvae",
        base_model=fields["base_model"],
        tags=list(dict.fromkeys([*GENERATOR_TAGS, *(tags or [])])),
        model_name=model_id.rstrip("/").split("/")[-1],
    )
    history = getattr(generator, "training_history", None)
    training = training_summary(history) if history else dict(getattr(config, "training_summary", None) or {})
    tasks = [
        {"name": name, "description": description}
        for name, description in zip(config.task_names, config.task_descriptions, strict=True)
    ]
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES / "generator_card.md"),
        model_id=model_id,
        tasks=tasks,
        example_task=config.task_names[0] if config.task_names else "a task name",
        condition_size=config.condition_size,
        condition_encoder=config.condition_encoder,
        generator_parameters=generator.num_parameters(),
        latent_size=config.latent_size,
        architecture=config.architecture,
        patch_size=config.patch_size,
        block_rows=config.block_rows,
        task_memory=f"yes ({config.task_memory_dtype})" if config.task_memory else "no",
        canonical_form=config.canonical_form or "none (the checkpoints as trained)",
        hidden_channels=config.hidden_channels,
        num_layers=config.num_layers,
        kl_weight=config.kl_weight,
        training=training,
        **fields,
        **_versions(),
    )


def _task_text(task: str | None, metadata: dict) -> str:
    """What an adapter was generated for, from `GeneratedAdapter.task` and the metadata `generate_adapter` records."""
    if "fused_tasks" in metadata:
        tasks = ", ".join(f"`{name}`" for name in json.loads(metadata["fused_tasks"]))
        weights = ", ".join(f"{weight:.3g}" for weight in json.loads(metadata.get("fusion_weights", "[]")))
        return f"a fusion of the tasks {tasks} (weights {weights}, combined by {metadata.get('combine', 'condition')})"
    if task is not None:
        return f"the task `{task}`"
    if "description" in metadata:
        return f'a new task described as "{metadata["description"]}"'
    if "examples" in metadata:
        return f"a task given by {metadata['examples']} example texts"
    return "a task given as a condition vector"


def adapter_model_card(adapter, model_id: str | None = None) -> ModelCard:
    """A PEFT-style card for a `GeneratedAdapter`: `library_name: peft`, `base_model`, tags `lora`, `peft-cvae` and
    `base_model:adapter:<base>` (the last two only when the base model is a Hub repo id), and a line saying which
    generator generated it for which task, seed and temperature."""
    layout = adapter.layout
    fields = _layout_fields(layout)
    base_model = fields["base_model"]
    tags = ["lora", "peft-cvae", "generated-lora"]
    if base_model:
        tags.insert(0, f"base_model:adapter:{base_model}")
    if fields["library"] == "diffusers":
        tags.append("diffusers")
    elif fields["task_type"] in AUTO_CLASSES:
        tags.append("transformers")
    card_data = ModelCardData(
        library_name="peft",
        base_model=base_model,
        tags=tags,
        pipeline_tag=None if fields["library"] == "diffusers" else PIPELINE_TAGS.get(fields["task_type"]),
        model_name=(model_id or "generated-lora").rstrip("/").split("/")[-1],
    )
    generator = adapter.generator_name_or_path
    generator_text = f"the peft-cvae generator `{generator}`" if generator else "an unsaved peft-cvae generator"
    task_text = _task_text(adapter.task, adapter.metadata)
    seed_text = f"seed {adapter.seed}" if adapter.seed is not None else "no seed"
    provenance = f"{generator_text} generated it for {task_text} ({seed_text}, temperature {adapter.temperature})."
    metadata = {
        "generator": generator or "not saved",
        "task": adapter.task if adapter.task is not None else "condition vector",
        "seed": adapter.seed if adapter.seed is not None else "not set",
        "temperature": adapter.temperature,
        **adapter.metadata,
    }
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES / "adapter_card.md"),
        model_id=model_id or "path/to/adapter",
        provenance=provenance[0].upper() + provenance[1:],
        metadata=metadata,
        auto_class=AUTO_CLASSES.get(fields["task_type"], "AutoModel"),
        **fields,
        **_versions(),
    )
