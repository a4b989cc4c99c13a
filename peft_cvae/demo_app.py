"""The interactive demo: a Gradio app around one trained generator (the field's convention: Text-to-LoRA ships a
Gradio UI, Drag-and-Drop a Space).

Why it is a module of the package and not a script in examples/: `peft-cvae demo` and the Hugging Face Space
(`spaces/app.py`) both call `build_demo` / `launch_demo`, so they must be importable after
`pip install "peft-cvae[demo]"`. gradio is imported only inside `build_demo`, so the package never needs it.

What the app does lives in `peft_cvae.adapter_demo.AdapterDemo`, a plain class with no gradio in it (tested without a
browser); `build_demo` only lays out the page and turns errors into messages in the page, never tracebacks.
"""

import os

from .adapter_demo import MODE_DESCRIPTION, MODE_EXAMPLES, MODE_TASK, AdapterDemo
from .errors import DemoError, PeftCVAEError
from .import_utils import require_gradio

__all__ = [
    "MODE_DESCRIPTION",
    "MODE_EXAMPLES",
    "MODE_TASK",
    "AdapterDemo",
    "DemoError",
    "build_demo",
    "launch_demo",
    "load_demo",
]


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
    gr = require_gradio()

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
                    headers=["training task", demo_backend.generator.similarity_name, "description"],
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
