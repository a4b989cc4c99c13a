"""Optional dependencies: whether they are installed, and one clear error naming the extra when they are needed (as
transformers' `utils/import_utils.py`). Check with `is_*_available()`; call `require_*()` where the code needs one,
which returns the imported module."""

import importlib
import importlib.util
import sys

from .errors import MissingExtraError

__all__ = [
    "is_diffusers_available",
    "is_matplotlib_available",
    "is_sklearn_available",
    "require_diffusers",
    "require_plots",
]


def _is_available(name: str) -> bool:
    if name in sys.modules:  # imported, or blocked with sys.modules[name] = None
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def is_diffusers_available() -> bool:
    return _is_available("diffusers")


def is_matplotlib_available() -> bool:
    return _is_available("matplotlib")


def is_sklearn_available() -> bool:
    return _is_available("sklearn")


def _require(module: str, purpose: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(
            f"{purpose} needs {module}, which is not installed. Install the {extra} extra: "
            f'pip install "peft-cvae[{extra}]" (or pip install {module}).'
        ) from error


def require_diffusers():
    """The `diffusers` module, or `MissingExtraError` naming the `diffusers` extra."""
    return _require("diffusers", "Reading or writing LoRAs of diffusion models", "diffusers")


def require_plots():
    """`matplotlib` switched to the non-interactive Agg backend (works without a display), or `MissingExtraError`
    naming the `plots` extra."""
    matplotlib = _require("matplotlib", "Plotting", "plots")
    matplotlib.use("Agg", force=True)
    return matplotlib


def require_gradio():
    """The `gradio` module, or `MissingExtraError` naming the `demo` extra."""
    return _require("gradio", "The interactive demo", "demo")
