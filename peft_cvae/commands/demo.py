"""`peft-cvae demo`: the interactive Gradio page of a generator (`peft_cvae.demo_app`), served on this machine."""

from dataclasses import dataclass, field

from .utils import add_command, model_path


@dataclass
class DemoArguments:
    """Where the demo's generator and base model come from, and where the page is served."""

    base_model: str | None = field(
        default=None,
        metadata={"help": "causal LM for the side-by-side comparison (default: the one recorded in the generator)"},
    )
    no_compare: bool = field(default=False, metadata={"help": "do not load a base model (no side-by-side text)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to serve on (0.0.0.0: every interface)"})
    port: int | None = field(default=None, metadata={"help": "port (default: gradio's, 7860 or the next free one)"})
    share: bool = field(default=False, metadata={"help": "also open a public gradio.live link"})


def register(commands) -> None:
    parser = add_command(
        commands,
        "demo",
        (DemoArguments,),
        help="serve an interactive page: describe a task, get its LoRA, try it",
        description="Serve the Gradio demo of a generator: pick a training task or describe a new one (or give a few "
        "examples), generate the adapter, see which training tasks it resembles, compare the base model with the "
        "adapted one on a prompt, download the adapter or push it to the Hub. Needs the demo extra: "
        'pip install "peft-cvae[demo]".',
    )
    parser.add_argument("generator", help="generator folder (or Hub repo id)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..demo_app import launch_demo

    base_model = model_path(args.base_model) if args.base_model else None
    launch_demo(
        model_path(args.generator),
        base_model,
        load_base_model=not args.no_compare,
        server_name=args.host,
        server_port=args.port,
        share=args.share,
    )
    return 0
