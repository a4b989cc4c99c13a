"""The interactive demo: a Gradio app around one trained generator (the field's convention: Text-to-LoRA ships a
Gradio UI, Drag-and-Drop a Space).

Why it is a module of the package and not a script in examples/: `peft-cvae demo` and the Hugging Face Space
(`spaces/app.py`) both call `build_demo` / `launch_demo`, so they must be importable after
`pip install "peft-cvae[demo]"`. gradio is imported only inside `build_demo`, so the package never needs it.

What the app does lives in `AdapterDemo`, a plain class with no gradio in it (tested without a browser); `build_demo`
only lays out the page and turns errors into messages in the page, never tracebacks.
"""

import atexit
import os
import re
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import ConditionError, PeftCVAEError, UnknownTaskError

__all__ = ["AdapterDemo", "DemoError", "build_demo", "launch_demo", "load_demo"]

MODE_TASK = "Training task"
MODE_DESCRIPTION = "Description"
MODE_EXAMPLES = "Examples (one per line)"
_ADAPTER_NAME = "peft_cvae_demo"  # the name the generated adapter gets inside the base model during a comparison


class DemoError(PeftCVAEError, ValueError):
    """A demo request that cannot be served as asked: no base model to compare with, an empty prompt or repo id."""


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
        stored = self.generator.task_conditions.float()  # (T, cond), saved with the generator
        cosine = F.cosine_similarity(condition.float().reshape(1, -1), stored, dim=-1)  # (T,)
        rows = [
            [name, round(value, 4), description]
            for name, value, description in zip(self.config.task_names, cosine.tolist(), self.config.task_descriptions)
        ]
        return sorted(rows, key=lambda row: -row[1])

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


def _message(error: Exception) -> str:
    """An exception as one readable line for the page: our errors as they are, others with their type."""
    text = str(error).strip() or type(error).__name__
    if not isinstance(error, PeftCVAEError):
        text = f"{type(error).__name__}: {text}"
    return text if len(text) <= 600 else text[:600] + " ..."


def build_demo(generator, base_model=None, tokenizer=None, *, allow_environment_token: bool = True, title=None):
    """The demo page for one generator, as a `gradio.Blocks` (not launched).

    Args:
        generator: a trained `PeftCVAEGenerator`, or an `AdapterDemo` built around one.
        base_model, tokenizer, allow_environment_token: see `AdapterDemo`.
        title: the page title.

    API endpoints (for `gradio_client`): `/generate` (mode, task, text, seed, temperature -> summary, similarity
    table, zip), `/compare` (prompt, max_new_tokens -> base text, adapted text), `/push` (repo id, token, private ->
    status). They act on the adapter last generated in the same session.
    """
    try:
        import gradio as gr
    except ImportError as error:
        raise ImportError('The demo needs gradio: pip install "peft-cvae[demo]"') from error

    demo_backend = (
        generator
        if isinstance(generator, AdapterDemo)
        else AdapterDemo(generator, base_model, tokenizer, allow_environment_token=allow_environment_token)
    )
    config = demo_backend.config
    modes = demo_backend.modes

    def on_mode(mode):
        text_label = "Description" if mode == MODE_DESCRIPTION else "Example texts, one per line"
        return gr.Dropdown(visible=mode == MODE_TASK), gr.Textbox(visible=mode != MODE_TASK, label=text_label)

    def on_generate(mode, task_name, text, seed, temperature):
        try:
            adapter, rows = demo_backend.generate(mode, task_name, text, seed=seed, temperature=temperature)
            archive = demo_backend.zip_adapter(adapter)
        except Exception as error:  # shown in the page, not as a traceback
            raise gr.Error(_message(error), print_exception=False) from error
        return demo_backend.summary(adapter, rows), rows, str(archive), adapter

    def on_compare(prompt, max_new_tokens, adapter):
        try:
            return demo_backend.compare(adapter, prompt, max_new_tokens)
        except Exception as error:
            raise gr.Error(_message(error), print_exception=False) from error

    def on_push(repo_id, token, private, adapter):
        try:
            url = demo_backend.push(adapter, repo_id, token, private)
        except Exception as error:  # a wrong token or repo id is a message, not a crash
            return f"Push failed: {_message(error)}"
        return f"Pushed to [{url}]({url})"

    with gr.Blocks(title=title or "peft-cvae: generate a LoRA") as demo:
        adapter_state = gr.State(None)  # the GeneratedAdapter last generated in this browser session
        gr.Markdown(f"# {title or 'peft-cvae: generate a LoRA adapter'}\n{demo_backend.describe()}")
        with gr.Row():
            with gr.Column():
                mode = gr.Radio(modes, value=modes[0] if modes else None, label="Condition on")
                first = modes[0] if modes else MODE_TASK
                task = gr.Dropdown(
                    config.task_names,
                    value=config.task_names[0] if config.task_names else None,
                    label="Training task",
                    visible=first == MODE_TASK,
                )
                text = gr.Textbox(
                    lines=4,
                    label="Description" if first == MODE_DESCRIPTION else "Example texts, one per line",
                    visible=first != MODE_TASK,
                )
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    temperature = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Temperature (0 = the mean)")
                generate = gr.Button("Generate adapter", variant="primary")
            with gr.Column():
                summary = gr.Markdown()
                similarity = gr.Dataframe(
                    headers=["training task", "cosine", "description"],
                    datatype=["str", "number", "str"],
                    label="Training tasks the condition resembles",
                    interactive=False,
                    wrap=True,
                    column_widths=["22%", "14%", "64%"],
                )
                download = gr.File(label="Adapter folder (zip)")
        with gr.Group(visible=demo_backend.can_compare):
            gr.Markdown("### Base model vs adapted model (greedy)")
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", scale=4)
                max_new_tokens = gr.Slider(1, 128, value=24, step=1, label="New tokens", scale=1)
            compare = gr.Button("Run both")
            with gr.Row():
                base_output = gr.Textbox(label="Base model", lines=4)
                adapted_output = gr.Textbox(label="With the generated adapter", lines=4)
        with gr.Accordion("Push the adapter to the Hugging Face Hub", open=False):
            with gr.Row():
                repo_id = gr.Textbox(label="Repo id", placeholder="your-name/my-generated-lora")
                token = gr.Textbox(label="Token (write access)", type="password")
                private = gr.Checkbox(label="Private")
            push = gr.Button("Push")
            push_status = gr.Markdown()

        mode.change(on_mode, mode, [task, text], api_name=False)
        generate.click(
            on_generate,
            [mode, task, text, seed, temperature],
            [summary, similarity, download, adapter_state],
            api_name="generate",
        )
        compare.click(
            on_compare, [prompt, max_new_tokens, adapter_state], [base_output, adapted_output], api_name="compare"
        )
        push.click(on_push, [repo_id, token, private, adapter_state], push_status, api_name="push")
    demo.adapter_demo = demo_backend  # for callers and tests that want the backend of a built page
    return demo


def load_demo(generator, base_model=None, *, token=None, load_base_model: bool = True):
    """Load what the demo needs from names: (generator, base_model, tokenizer).

    Args:
        generator: a `PeftCVAEGenerator`, or the folder or Hub repo id of one.
        base_model: a transformers causal LM (then its tokenizer is loaded from its `name_or_path`), a folder or Hub
            id, or None for the base model recorded in the generator's LoRA config.
        token: Hugging Face token for private repos (None: the machine's login).
        load_base_model: False skips the base model (no side-by-side comparison).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .modeling_peft_cvae import PeftCVAEGenerator

    if isinstance(generator, (str, os.PathLike)):
        generator = PeftCVAEGenerator.from_pretrained(generator, token=token)
    layout = generator.config.lora_layout
    if not load_base_model or layout.library != "peft":
        return generator, None, None
    recorded = base_model is None
    if recorded:
        base_model = layout.lora_config.get("base_model_name_or_path")
        if not base_model:
            return generator, None, None  # nothing recorded: the page says the comparison is off
    if isinstance(base_model, (str, os.PathLike)):
        try:
            model = AutoModelForCausalLM.from_pretrained(base_model, token=token).eval()
        except (OSError, ValueError) as error:
            if not recorded:
                raise
            raise DemoError(
                f"The generator's LoRAs record the base model {str(base_model)!r}, which cannot be loaded here "
                f"({str(error).splitlines()[0]}). Name the base model (base_model=, or PEFT_CVAE_BASE_MODEL on a "
                "Space), or turn the comparison off (load_base_model=False, or PEFT_CVAE_BASE_MODEL=none)."
            ) from error
        source = base_model
    else:
        model, source = base_model, getattr(base_model, "name_or_path", None)
    if not source:
        raise DemoError("The base model records no name_or_path to load its tokenizer from; pass a folder or Hub id.")
    return generator, model, AutoTokenizer.from_pretrained(source, token=token)


def launch_demo(
    generator,
    base_model=None,
    tokenizer=None,
    *,
    token=None,
    load_base_model: bool = True,
    allow_environment_token: bool = True,
    **launch_kwargs,
):
    """Build the demo and launch it (`gradio.Blocks.launch(**launch_kwargs)`, e.g. `server_port=7860, share=True`,
    `prevent_thread_lock=True`). Returns the launched `gradio.Blocks`; `demo.close()` stops it.

    `generator` and `base_model` may be objects or names (see `load_demo`); with a base model object, pass its
    `tokenizer` or let it be loaded from the model's `name_or_path`.
    """
    if tokenizer is None:
        generator, base_model, tokenizer = load_demo(
            generator, base_model, token=token, load_base_model=load_base_model
        )
    elif isinstance(generator, (str, os.PathLike)):
        generator, _, _ = load_demo(generator, token=token, load_base_model=False)
    demo = build_demo(generator, base_model, tokenizer, allow_environment_token=allow_environment_token)
    launch_kwargs.setdefault("server_name", "127.0.0.1")
    demo.launch(**launch_kwargs)
    return demo
