"""`GeneratedAdapter`: a LoRA written by a generator, in the form PEFT expects."""

import os
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from .adapter_io import lora_config_to_dict
from .constants import ADAPTER_WEIGHTS_NAME, CARD_NAME
from .diffusers_utils import save_diffusers_lora_weights
from .errors import LayoutMismatchError, NonFiniteError
from .file_utils import atomic_directory, write_safetensors
from .hub import push_folder_to_hub
from .integrity import write_integrity_record
from .layout import LoraLayout
from .model_card import adapter_model_card

__all__ = ["GeneratedAdapter"]


def _named(base_model_name: str | None) -> str:
    return f" ({base_model_name!r})" if base_model_name else ""


def _remove_adapter(model: PeftModel, adapter_name: str, *, base_was_peft: bool) -> None:
    """Undo `to_peft_model` after a failed load: drop the new adapter from a `PeftModel` the caller passed, or take
    the LoRA layers out of a plain base model again, so a refused adapter leaves the caller's model unchanged."""
    if base_was_peft:
        model.delete_adapter(adapter_name)
    else:
        model.unload()


@dataclass
class GeneratedAdapter:
    """A generated LoRA adapter: PEFT state dict (saved-key form) plus the layout that describes it.

    Attributes:
        state_dict: `{"base_model.model.<module>.lora_A.weight": tensor, ...}`, as `get_peft_model_state_dict` gives.
        layout: the generator's `LoraLayout` (keys, shapes, dtype, LoRA config).
        task: name of the training task it was generated for, or None for a condition tensor.
        generator_name_or_path, seed, temperature: provenance, written into the adapter's metadata.
        metadata: further provenance, written into the safetensors metadata and the card: the description or
            `examples_sha256`, fused tasks and weights, `generator_sha256`, `peft_cvae_version`, `neighbours`.
        neighbours: the training tasks nearest to the condition it was generated from, best first:
            `{"task", "similarity"}` (cosine) plus `"memory_weight"` for generators with task memory
            (see `PeftCVAEGenerator.condition_neighbours`).
    """

    state_dict: dict[str, torch.Tensor]
    layout: LoraLayout
    task: str | None = None
    generator_name_or_path: str | None = None
    seed: int | None = None
    temperature: float = 1.0
    metadata: dict = field(default_factory=dict)
    neighbours: list[dict] = field(default_factory=list)

    @property
    def peft_config(self) -> LoraConfig:
        """The adapter's `LoraConfig` (a fresh copy each time)."""
        return self.layout.peft_config()

    def _check(self) -> None:
        self.layout.check(self.state_dict)
        for key, tensor in self.state_dict.items():
            if not torch.isfinite(tensor).all():
                raise NonFiniteError(
                    f"Tensor {key!r} of the generated adapter has NaN or Inf; nothing was written. Expected finite "
                    "LoRA weights: generate it again, or retrain the generator if it keeps happening."
                )

    def save_pretrained(self, save_directory: str | os.PathLike, *, model_id: str | None = None) -> None:
        """Write `adapter_config.json` and `adapter_model.safetensors`, loadable by `PeftModel.from_pretrained`.

        For a diffusers UNet (`layout.library == "diffusers"`) also write diffusers' `pytorch_lora_weights.safetensors`
        with the LoRA config as `lora_adapter_metadata`, so `pipe.load_lora_weights(save_directory)` loads the same
        tensors at the same scale (`lora_alpha / r`). A PEFT-style `README.md` card (the one `push_to_hub` uploads,
        see `adapter_model_card`) says which generator made it, for what. Files are written to a temporary folder
        first and moved into place only when complete; the last one written is `peft_cvae_integrity.json`, the
        sha256 of each file (the card left out), which peft-cvae checks when it reads the adapter back (PEFT and
        diffusers ignore it). `model_id` names the adapter in the card (default: `save_directory`; `push_to_hub`
        passes the repo id).
        """
        self._check()
        provenance = {"generated_by": "peft-cvae"}
        provenance.update({key: str(value) for key, value in self._provenance().items() if value is not None})
        with atomic_directory(save_directory) as staging:
            self.peft_config.save_pretrained(staging)
            write_safetensors(self.state_dict, staging / ADAPTER_WEIGHTS_NAME, metadata=provenance)
            if self.layout.library == "diffusers":
                save_diffusers_lora_weights(self.state_dict, lora_config_to_dict(self.peft_config), staging)
            adapter_model_card(self, model_id=model_id or str(save_directory)).save(staging / CARD_NAME)
            write_integrity_record(staging)  # last: checked when peft-cvae reads the adapter back

    def _provenance(self) -> dict:
        return {
            "task": self.task,
            "generator": self.generator_name_or_path,
            "seed": self.seed,
            "temperature": self.temperature,
            **self.metadata,
        }

    def to_peft_model(self, base_model, adapter_name: str = "default") -> PeftModel:
        """Load the adapter into `base_model` (modified in place, as with PEFT) and return the `PeftModel`.

        If `base_model` is already a `PeftModel`, the adapter is added under `adapter_name` and made active.
        """
        self._check()
        if isinstance(base_model, PeftModel):
            base_model.add_adapter(adapter_name, self.peft_config)
            model = base_model
        else:
            model = get_peft_model(base_model, self.peft_config, adapter_name=adapter_name)
        expected = get_peft_model_state_dict(model, adapter_name=adapter_name)  # saved-key form, like ours
        wrong = [
            key for key, tensor in self.state_dict.items() if key in expected and expected[key].shape != tensor.shape
        ]
        if wrong:
            _remove_adapter(model, adapter_name, base_was_peft=model is base_model)
            raise LayoutMismatchError(
                f"The generated adapter does not fit this base model: {wrong[0]!r} has shape "
                f"{tuple(self.state_dict[wrong[0]].shape)} but the model's LoRA layer has shape "
                f"{tuple(expected[wrong[0]].shape)} ({len(wrong)} such tensors). Use the base model the generator's "
                f"adapters were trained on{_named(self.layout.lora_config.get('base_model_name_or_path'))}; the "
                "model was left as it was."
            )
        result = set_peft_model_state_dict(model, self.state_dict, adapter_name=adapter_name)
        missing = [key for key in result.missing_keys if f".{adapter_name}." in key and "lora_" in key]
        if result.unexpected_keys or missing:
            first = (result.unexpected_keys or missing)[0]
            _remove_adapter(model, adapter_name, base_was_peft=model is base_model)
            raise LayoutMismatchError(
                f"The generated adapter does not fit this base model (first mismatch: {first!r}; "
                f"{len(missing)} missing, {len(result.unexpected_keys)} unexpected). Use the base model the "
                f"generator's adapters were trained on ({self.layout.lora_config.get('base_model_name_or_path')!r})."
            )
        model.set_adapter(adapter_name)
        return model

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: bool | str | None = None,
        commit_message: str | None = None,
        commit_description: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ):
        """Upload the adapter as a standard PEFT adapter repo, in one commit.

        The repo holds what `save_pretrained` writes (`adapter_config.json`, `adapter_model.safetensors`, and for
        diffusers UNets `pytorch_lora_weights.safetensors`) plus a PEFT-style `README.md` (`library_name: peft`,
        `base_model`, tags `base_model:adapter:<base>`, `lora`, `peft-cvae`, and a line saying which generator
        generated it for which task, seed and temperature; see `peft_cvae.model_card.adapter_model_card`). So
        `PeftModel.from_pretrained(base, repo_id)` loads it without peft-cvae installed.

        Errors are huggingface_hub's own `HfHubHTTPError` subclasses (e.g. a 401/403 for a wrong token).

        Returns:
            the `huggingface_hub.CommitInfo` of the upload.
        """

        def save(folder, full_repo_id):
            self.save_pretrained(folder, model_id=full_repo_id)

        return push_folder_to_hub(
            save,
            repo_id,
            commit_message=commit_message or "Upload LoRA adapter generated by peft-cvae",
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )
