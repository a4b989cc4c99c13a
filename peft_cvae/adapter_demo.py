"""`AdapterDemo`: what the interactive demo does (generate, rank training tasks, compare, zip, push), without gradio.

Kept apart from the page (`peft_cvae.demo_app`) so it can be used and tested without gradio installed, and so the
page module only lays out components.
"""

import atexit
import re
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

import torch

from .errors import ConditionError, DemoError, UnknownTaskError

__all__ = ["MODE_DESCRIPTION", "MODE_EXAMPLES", "MODE_TASK", "AdapterDemo", "DemoError"]

MODE_TASK = "Training task"
MODE_DESCRIPTION = "Description"
MODE_EXAMPLES = "Examples (one per line)"
_ADAPTER_NAME = "peft_cvae_demo"  # the name the generated adapter gets inside the base model during a comparison


def _slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a task name or description."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit].strip("-").lower() or "adapter"


class AdapterDemo:
    """Everything the demo page does, without the page: generate, compare, zip, push.

    Args:
        generator: a trained `PeftCVAEGenerator` (put in eval mode).
        base_model: the transformers causal LM its LoRAs were trained on, for the side-by-side comparison and for a
            hidden-state task encoder. Optional: without it there is no comparison, and a hidden-state encoder loads
            the model recorded in the generator's config. It is borrowed during a comparison (the LoRA layers are put
            in and taken out again under a lock), so one copy serves every visitor.
        tokenizer: its tokenizer; needed with `base_model`.
        allow_environment_token: let a push with an empty token field use the machine's Hugging Face login
            (`HF_TOKEN`, `huggingface-cli login`). Right on your own machine; wrong on a public Space, where it
            would let every visitor push with the Space owner's token.
    """

    def __init__(self, generator, base_model=None, tokenizer=None, *, allow_environment_token: bool = True):
        from peft import PeftModel

        if base_model is not None and tokenizer is None:
            raise DemoError(
                "base_model was given without its tokenizer; pass tokenizer=AutoTokenizer.from_pretrained(...) too."
            )
        if isinstance(base_model, PeftModel):
            raise DemoError(
                "base_model is a PeftModel; pass the plain transformers model (peft_model.get_base_model() after "
                "unloading its adapters), so 'base' really means the model without a LoRA."
            )
        self.generator = generator.eval()
        self.base_model = base_model.eval() if base_model is not None else None
        self.tokenizer = tokenizer
        self.allow_environment_token = allow_environment_token
        self._task_encoder = None
        self._lock = threading.Lock()  # the base model is shared; a comparison puts LoRA layers into it for a while
        self._work_dir = Path(tempfile.mkdtemp(prefix="peft-cvae-demo-"))  # the zips offered for download
        atexit.register(shutil.rmtree, self._work_dir, ignore_errors=True)

    # ---- what this generator accepts ------------------------------------------------------------------------------
    @property
    def config(self):
        return self.generator.config

    @property
    def encoder_kind(self) -> str | None:
        """`"text"`, `"hidden_state"`, or None when the generator records no task encoder."""
        return (self.config.condition_encoder or {}).get("kind")

    @property
    def modes(self) -> list[str]:
        """The ways to name a task this generator supports: its training tasks always; a description with a text
        encoder; example texts with a hidden-state (in-context) encoder."""
        modes = [MODE_TASK] if self.config.task_names else []
        if self.encoder_kind == "text":
            modes.append(MODE_DESCRIPTION)
        elif self.encoder_kind == "hidden_state":
            modes.append(MODE_EXAMPLES)
        return modes

    @property
    def library(self) -> str:
        return self.config.lora_layout.library

    @property
    def can_compare(self) -> bool:
        """A prompt can be run through the base and the adapted model (a causal LM was given)."""
        return self.base_model is not None and self.library == "peft"

    def describe(self) -> str:
        """A Markdown paragraph about the loaded generator, for the top of the page."""
        lora = self.config.lora_layout.lora_config
        base = lora.get("base_model_name_or_path") or "not recorded"
        encoder = self.config.condition_encoder
        encoder_text = f"`{encoder.get('kind')}` encoder (`{encoder.get('name_or_path')}`)" if encoder else "none"
        lines = [
            f"**Generator** `{self.config.name_or_path or 'in memory'}` — {len(self.config.task_names)} training "
            f"tasks, LoRA r={lora.get('r')} on {', '.join(sorted(lora.get('target_modules') or []))} of `{base}`.",
            f"**Task encoder**: {encoder_text}.",
        ]
        if not self.can_compare:
            why = (
                "a diffusers UNet LoRA: load the zip with `pipe.load_lora_weights`"
                if self.library == "diffusers"
                else "no base model was loaded"
            )
            lines.append(f"**Side-by-side comparison** is off ({why}).")
        return "  \n".join(lines)

    # ---- generation ------------------------------------------------------------------------------------------------
    def task_encoder(self):
        """The generator's recorded task encoder, running this demo's base model when it is a hidden-state one."""
        if self._task_encoder is None:
            base = self.base_model if self.encoder_kind == "hidden_state" else None
            self._task_encoder = self.generator.get_task_encoder(base_model=base, tokenizer=self.tokenizer)
        return self._task_encoder

    def _request(self, mode: str, task_name: str | None, text: str | None) -> tuple[dict, object]:
        """A form's fields -> generate_adapter's task arguments, and what `task_condition` takes for the same task."""
        if mode not in self.modes:
            accepted = " or ".join(repr(item) for item in self.modes)
            raise ConditionError(
                f"This generator takes {accepted}, not {mode!r}: its task encoder is {self.encoder_kind or 'none'}."
            )
        if mode == MODE_TASK:
            if task_name not in self.config.task_names:
                known = ", ".join(repr(name) for name in self.config.task_names)
                raise UnknownTaskError(f"Pick one of the training tasks {known}; got {task_name!r}.")
            return {"task": task_name}, task_name
        if mode == MODE_DESCRIPTION:
            description = (text or "").strip()
            if not description:
                raise ConditionError("The description is empty; type what the adapter should be good at.")
            return {"task": description, "task_encoder": self.task_encoder()}, description
        examples = [line.strip() for line in (text or "").splitlines() if line.strip()]
        if not examples:
            raise ConditionError("No examples; type a few example texts of the task, one per line.")
        return {"examples": examples, "task_encoder": self.task_encoder()}, examples

    def similarities(self, condition: torch.Tensor) -> list[list]:
        """Cosine similarity of a condition to each training task's condition, highest first:
        rows of [task, cosine, description]. The generator's decoder (and its task memory, if any) is steered by
        exactly these conditions, so the closest tasks say what the new adapter is likely to resemble."""
        descriptions = dict(zip(self.config.task_names, self.config.task_descriptions))
        neighbours = self.generator.condition_neighbours(condition, top_k=len(descriptions))  # all tasks, best first
        return [[entry["task"], entry["similarity"], descriptions[entry["task"]]] for entry in neighbours]

    def generate(self, mode: str, task_name: str | None = None, text: str | None = None, *, seed=0, temperature=1.0):
        """Generate an adapter from the form's fields.

        Returns:
            (adapter, similarity rows): a `GeneratedAdapter`, and `similarities` of its condition.
        """
        seed = None if seed is None or seed == "" else int(seed)
        temperature = float(temperature)
        kwargs, task = self._request(mode, task_name, text)
        with self._lock:  # a hidden-state encoder runs the shared base model
            condition, _ = self.generator.task_condition(task, task_encoder=kwargs.get("task_encoder"))
            adapter = self.generator.generate_adapter(**kwargs, seed=seed, temperature=temperature)
        return adapter, self.similarities(condition)

    def summary(self, adapter, similarities: list[list]) -> str:
        """A Markdown line about a generated adapter."""
        if adapter.task is not None:
            what = f"training task **{adapter.task}**"
        elif "examples" in adapter.metadata:
            what = f"**{adapter.metadata['examples']} examples**"
        else:
            what = f"the description *{adapter.metadata.get('description', '')}*"
        numel = sum(tensor.numel() for tensor in adapter.state_dict.values())
        closest = f" Closest training task: **{similarities[0][0]}** (cosine {similarities[0][1]:.3f})."
        return (
            f"Generated a LoRA for {what} (seed {adapter.seed}, temperature {adapter.temperature:g}): "
            f"{len(adapter.state_dict)} tensors, {numel:,} parameters.{closest if similarities else ''}"
        )

    # ---- comparison ------------------------------------------------------------------------------------------------
    def _continue(self, model, prompt: str, max_new_tokens: int) -> str:
        encoded = self.tokenizer(prompt, return_tensors="pt")
        device = next(model.parameters()).device
        inputs = {name: encoded[name].to(device) for name in ("input_ids", "attention_mask") if name in encoded}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        return self.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    @torch.no_grad()
    def compare(self, adapter, prompt: str, max_new_tokens: int = 24) -> tuple[str, str]:
        """Greedy continuations of `prompt` by the base model and by the base model with `adapter`, each without the
        prompt. The adapter is put into the shared base model and taken out again (`PeftModel.unload`)."""
        if not self.can_compare:
            raise DemoError(
                "No base model is loaded, so there is nothing to compare: start the demo with base_model= and "
                "tokenizer= (or let launch_demo load the base model the generator records)."
            )
        if adapter is None:
            raise DemoError("Generate an adapter first.")
        if not prompt or not prompt.strip():
            raise DemoError("The prompt is empty; type the start of a text for both models to continue.")
        max_new_tokens = int(max_new_tokens)
        if max_new_tokens < 1:
            raise DemoError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        with self._lock:
            base_text = self._continue(self.base_model, prompt, max_new_tokens)
            adapted = adapter.to_peft_model(self.base_model, adapter_name=_ADAPTER_NAME)
            try:
                adapted_text = self._continue(adapted, prompt, max_new_tokens)
            finally:
                adapted.unload()  # takes the LoRA layers out: self.base_model is the plain model again
        return base_text, adapted_text

    # ---- sharing ---------------------------------------------------------------------------------------------------
    def zip_adapter(self, adapter) -> Path:
        """Write the adapter folder (`adapter.save_pretrained`) and pack it as a zip of one folder; returns the zip.

        Unzipped, the folder loads with `PeftModel.from_pretrained(base_model, folder)`."""
        if adapter is None:
            raise DemoError("Generate an adapter first.")
        label = (
            adapter.task or adapter.metadata.get("description") or f"{adapter.metadata.get('examples', 0)}-examples"
        )
        name = f"peft-cvae-{_slug(label)}-seed{adapter.seed}"
        where = self._work_dir / uuid.uuid4().hex  # one folder per request: visitors never overwrite each other
        adapter.save_pretrained(where / name)
        archive = shutil.make_archive(str(where / name), "zip", root_dir=where, base_dir=name)
        shutil.rmtree(where / name)
        return Path(archive)

    def push(self, adapter, repo_id: str, token: str | None = None, private: bool = False) -> str:
        """Push the adapter as a PEFT adapter repo (`GeneratedAdapter.push_to_hub`); returns the repo's URL."""
        if adapter is None:
            raise DemoError("Generate an adapter first.")
        repo_id = (repo_id or "").strip()
        if not repo_id:
            raise DemoError("Type a repo id to push to, e.g. your-name/my-generated-lora.")
        token = (token or "").strip() or None
        if token is None and not self.allow_environment_token:
            raise DemoError("Type a Hugging Face token with write access (https://huggingface.co/settings/tokens).")
        commit = adapter.push_to_hub(repo_id, token=token, private=bool(private))
        return str(commit.repo_url)
