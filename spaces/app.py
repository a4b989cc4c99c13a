"""Hugging Face Space entry point of the peft-cvae demo (docs/demo.md).

Copy this folder (app.py, requirements.txt, README.md) into a Gradio Space and set, under Settings -> Variables:

- `PEFT_CVAE_GENERATOR` (required): the Hub repo id (or folder) of a generator written by
  `PeftCVAEGenerator.push_to_hub` / `save_pretrained`.
- `PEFT_CVAE_BASE_MODEL` (optional): the base model's repo id, when the generator's LoRA config records a local path
  or no base model; `none` turns the base-vs-adapted comparison off (saves the memory of the base model).
- `PEFT_CVAE_TITLE` (optional): the page title.
- `HF_TOKEN` (a secret, optional): read access to a private generator or base model. It is never used for pushes:
  every visitor types their own token (AdapterDemo's allow_environment_token=False).
"""

import os

from peft_cvae.demo_app import build_demo, load_demo
from peft_cvae.errors import DemoError


def create_demo(environ=os.environ):
    """The demo page for the generator named by the environment (not launched)."""
    generator = environ.get("PEFT_CVAE_GENERATOR", "").strip()
    if not generator:
        raise DemoError(
            "Set PEFT_CVAE_GENERATOR to the Hub repo id or folder of a peft-cvae generator (a Space: Settings -> "
            "Variables; locally: PEFT_CVAE_GENERATOR=user/my-generator python spaces/app.py)."
        )
    base_model = environ.get("PEFT_CVAE_BASE_MODEL", "").strip() or None
    compare = base_model is None or base_model.lower() != "none"
    loaded = load_demo(
        generator,
        base_model if compare else None,
        token=environ.get("HF_TOKEN") or None,
        load_base_model=compare,
    )
    return build_demo(*loaded, allow_environment_token=False, title=environ.get("PEFT_CVAE_TITLE") or None)


demo = create_demo()

if __name__ == "__main__":
    demo.launch()  # a Space sets GRADIO_SERVER_NAME=0.0.0.0 and the port itself
