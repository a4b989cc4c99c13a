"""Diffusion LoRAs: a bank of real UNet LoRAs -> generator -> adapter that diffusers' `load_lora_weights` loads.

Everything runs on a tiny `StableDiffusionPipeline` built from configs (UNet from DESIGN §4, one-block VAE, one-layer
CLIP text encoder, a seven-token CLIP tokenizer written to a temporary folder), offline and in seconds. The LoRAs use
lora_alpha = 6 != r = 2, so a loader that forgets the alpha (diffusers assumes lora_alpha = r without
`lora_adapter_metadata`) gives visibly different outputs.
"""

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import StableDiffusionPipeline  # noqa: E402
from diffusers.utils import convert_state_dict_to_diffusers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from safetensors import safe_open  # noqa: E402

from peft_cvae import (  # noqa: E402
    CorruptFileError,
    LoraBank,
    LoraLayout,
    PeftCVAEGenerator,
    UnsupportedAdapterError,
    train_generator,
)
from peft_cvae.adapter_io import load_diffusers_lora  # noqa: E402
from peft_cvae.diffusers_utils import (  # noqa: E402
    DIFFUSERS_WEIGHTS_NAME,
    PEFT_PREFIX,
    get_diffusers_lora_state_dict,
)
from peft_cvae.testing_utils import save_tiny_clip_tokenizer, tiny_stable_diffusion_pipeline, tiny_unet  # noqa: E402
from tests.testing_utils import fine_tune, small_generator_overrides  # noqa: E402

RANK, ALPHA = 2, 6  # alpha != r on purpose: diffusers would rescale by r / alpha if it lost the alpha
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TASKS = {"negate": lambda x: -x, "flip": lambda x: x.flip(-1), "shift": lambda x: x.roll(3, dims=-2)}


def unet_lora_config() -> LoraConfig:
    return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS)


def unet_inputs(seed: int = 0, batch_size: int = 2):
    """Latents (B, 4, 16, 16), a timestep and text embeddings (B, 5, 8)."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch_size, 4, 16, 16, generator=generator)
    return latents, torch.tensor(10), torch.randn(batch_size, 5, 8, generator=generator)


def train_unet_lora(task: str, steps: int = 12, keep_from: int = 6):
    """Fine-tune a LoRA added the diffusers way (`unet.add_adapter`) so the UNet maps latents to the task's target;
    return the UNet and its LoRA state dicts (PEFT saved form) at steps keep_from, keep_from + 2, ..."""
    unet = tiny_unet()
    torch.manual_seed(1)  # the same LoRA init for every task, as with a fixed training seed
    unet.add_adapter(unet_lora_config())
    data = torch.Generator().manual_seed(2)

    def loss(unet):
        latents = torch.randn(4, 4, 16, 16, generator=data)
        text = torch.randn(4, 5, 8, generator=data)
        return torch.nn.functional.mse_loss(unet(latents, 10, text).sample, TASKS[task](latents))

    checkpoints = fine_tune(
        unet, loss, steps=steps, keep_from=keep_from, every=2, state_dict=get_diffusers_lora_state_dict
    )
    return unet.eval(), checkpoints


def tiny_pipeline(folder) -> StableDiffusionPipeline:
    """A complete Stable Diffusion pipeline of tiny random models, with a real CLIP tokenizer of seven tokens."""
    return tiny_stable_diffusion_pipeline(save_tiny_clip_tokenizer(folder, words=("a", "b")))


def strip(state_dict):
    return {key.removeprefix(PEFT_PREFIX): tensor for key, tensor in state_dict.items()}


@pytest.fixture(scope="module")
def unet_runs():
    """{task: (trained unet, [(step, state dict), ...])} for the three tasks."""
    return {task: train_unet_lora(task) for task in TASKS}


@pytest.fixture(scope="module")
def unet_bank(unet_runs):
    generator = torch.Generator().manual_seed(0)
    bank = None
    for task, (unet, checkpoints) in unet_runs.items():
        if bank is None:
            bank = LoraBank(LoraLayout.from_diffusers(unet))
        for step, state in checkpoints:
            bank.add_checkpoint(task, state, step=step)
        bank.set_condition(task, torch.randn(8, generator=generator), description=f"UNet LoRA that learns {task}")
    return bank


@pytest.fixture(scope="module")
def unet_generator(unet_bank):
    # The plain decoder: the tests check that the network itself learns the UNet LoRAs (the loss halves), which task
    # memory would make moot (its task means already reconstruct them).
    generator = PeftCVAEGenerator.from_bank(unet_bank, task_memory=False, **small_generator_overrides())
    history = train_generator(generator, unet_bank, epochs=60, lr=3e-3, batch_size=4, show_progress=False)
    generator.training_history = history
    return generator.eval()


@pytest.fixture(scope="module")
def saved_adapter(unet_generator, tmp_path_factory):
    adapter = unet_generator.generate_adapter("flip", seed=0)
    folder = tmp_path_factory.mktemp("generated") / "flip-lora"
    adapter.save_pretrained(folder)
    return adapter, folder


def test_diffusers_and_peft_routes_give_one_layout(unet_runs):
    unet, checkpoints = unet_runs["negate"]
    layout = LoraLayout.from_diffusers(unet)
    assert layout.library == "diffusers"
    assert layout.lora_config["r"] == RANK and layout.lora_config["lora_alpha"] == ALPHA
    assert all(key.startswith(PEFT_PREFIX) and ".lora_" in key for key in layout.keys)
    # peft.get_peft_model(unet, config) saves exactly these keys: both ways of adding a LoRA give one layout.
    peft_unet = get_peft_model(tiny_unet(), unet_lora_config())
    peft_layout = LoraLayout.from_peft_model(peft_unet)
    assert peft_layout.keys == layout.keys and peft_layout.shapes == layout.shapes
    assert peft_layout.library == "diffusers"
    assert LoraLayout.from_dict(layout.to_dict()) == layout
    # checkpoints really differ between tasks (they trained on different targets)
    first = layout.flatten(checkpoints[-1][1])
    other = layout.flatten(unet_runs["flip"][1][-1][1])
    assert (first - other).norm() > 0.1 * first.norm()


def test_bank_reads_diffusers_lora_folders(unet_runs, tmp_path):
    """Folders written like diffusers' training scripts (`save_lora_weights` with metadata) make a bank whose
    tensors equal the UNet's, with library="diffusers"."""
    folders = {}
    for task in ("negate", "flip"):
        unet, checkpoints = unet_runs[task]
        folders[task] = []
        for step, state in checkpoints[-2:]:
            folder = tmp_path / f"{task}-{step}"
            StableDiffusionPipeline.save_lora_weights(
                folder,
                unet_lora_layers=convert_state_dict_to_diffusers(strip(state)),
                unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            )
            folders[task].append(folder)
    bank = LoraBank.from_adapters(folders)
    assert bank.layout.library == "diffusers"
    assert bank.layout.lora_config["lora_alpha"] == ALPHA
    expected = unet_runs["flip"][1][-1][1]
    loaded = bank.checkpoints_of("flip")[-1].state_dict
    assert sorted(loaded) == sorted(expected)
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)

    # A model-level file (`unet.save_lora_adapter`: keys and metadata without the "unet." prefix) reads the same.
    unet = unet_runs["flip"][0]
    unet.save_lora_adapter(tmp_path / "model-level")
    config, state = load_diffusers_lora(tmp_path / "model-level")
    assert config["lora_alpha"] == ALPHA and config["r"] == RANK
    current = get_diffusers_lora_state_dict(unet)
    assert sorted(state) == sorted(current) and all(torch.equal(state[key], current[key]) for key in current)

    # Without lora_adapter_metadata the alpha is not recorded: read as lora_alpha = r, as diffusers does, with a
    # warning (tests/test_diffusers_formats.py checks the UNet output against diffusers' own loading).
    bare = tmp_path / "no-metadata"
    StableDiffusionPipeline.save_lora_weights(bare, unet_lora_layers=strip(expected))
    with pytest.warns(UserWarning, match="no lora_adapter_metadata"):
        config, state = load_diffusers_lora(bare)
    assert config["lora_alpha"] == config["r"] == RANK
    assert all(torch.equal(state[key], expected[key]) for key in expected)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    data = (folders["flip"][0] / DIFFUSERS_WEIGHTS_NAME).read_bytes()
    (truncated / DIFFUSERS_WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="not a readable diffusers LoRA file"):
        LoraBank.from_adapters({"flip": [truncated]})


def test_bank_from_peft_folders_of_a_unet(unet_runs, tmp_path):
    """PEFT folders do not say their base is a diffusers UNet: `library="diffusers"` says it."""
    folders = []
    for step, state in unet_runs["shift"][1][:2]:
        peft_unet = get_peft_model(tiny_unet(), unet_lora_config())
        set_peft_model_state_dict(peft_unet, state)
        peft_unet.save_pretrained(tmp_path / f"shift-{step}")
        folders.append(tmp_path / f"shift-{step}")
    assert LoraBank.from_adapters({"shift": folders}).layout.library == "peft"
    bank = LoraBank.from_adapters({"shift": folders}, library="diffusers")
    assert bank.layout.library == "diffusers"
    expected = unet_runs["shift"][1][1][1]
    assert all(torch.equal(bank.checkpoints[1].state_dict[key], expected[key]) for key in expected)


def test_generator_learns_unet_loras(unet_bank, unet_generator, tmp_path):
    history = unet_generator.training_history
    assert history[-1]["reconstruction_loss"] < 0.5 * history[0]["reconstruction_loss"]
    layout = unet_bank.layout
    means = {
        task: torch.stack([layout.flatten(c.state_dict) for c in unet_bank.checkpoints_of(task)]).mean(dim=0)
        for task in unet_bank.task_names
    }
    for task in unet_bank.task_names:
        generated = layout.flatten(unet_generator.generate_adapter(task, seed=0).state_dict)
        distances = {other: (generated - mean).norm().item() for other, mean in means.items()}
        assert min(distances, key=distances.get) == task, distances

    # The library travels with the layout through the bank's and the generator's files.
    unet_bank.save_pretrained(tmp_path / "bank")
    assert LoraBank.from_pretrained(tmp_path / "bank").layout.library == "diffusers"
    unet_generator.save_pretrained(tmp_path / "generator")
    reloaded = PeftCVAEGenerator.from_pretrained(tmp_path / "generator")
    assert reloaded.config.lora_layout.library == "diffusers"
    original = unet_generator.generate_adapter("flip", seed=0).state_dict
    again = reloaded.generate_adapter("flip", seed=0).state_dict
    assert all(torch.equal(original[key], again[key]) for key in original)


def test_generated_adapter_writes_peft_and_diffusers_files(unet_generator, saved_adapter):
    adapter, folder = saved_adapter
    assert {path.name for path in folder.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        DIFFUSERS_WEIGHTS_NAME,
    }
    with safe_open(str(folder / DIFFUSERS_WEIGHTS_NAME), "pt") as file:
        metadata = json.loads(file.metadata()["lora_adapter_metadata"])
        keys = list(file.keys())
    assert metadata["unet.lora_alpha"] == ALPHA and metadata["unet.r"] == RANK
    assert all(key.startswith("unet.") for key in keys) and len(keys) == len(adapter.state_dict)


def test_load_lora_weights_matches_peft_route(unet_generator, saved_adapter, tmp_path):
    adapter, folder = saved_adapter
    layout = unet_generator.config.lora_layout
    pipe = tiny_pipeline(tmp_path)
    latents, timestep, text = unet_inputs()
    with torch.no_grad():
        base_output = pipe.unet(latents, timestep, text).sample

    pipe.load_lora_weights(folder, adapter_name="generated")
    loaded_config = pipe.unet.peft_config["generated"]
    assert loaded_config.lora_alpha == layout.lora_config["lora_alpha"] == ALPHA
    assert loaded_config.r == RANK
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="generated")

    # The PEFT route, checked: no missing or unexpected keys.
    peft_unet = PeftModel.from_pretrained(tiny_unet(), folder)
    result = peft_unet.load_adapter(folder, adapter_name="check")
    assert [key for key in result.missing_keys if "lora_" in key] == [] and result.unexpected_keys == []
    peft_state = strip(get_peft_model_state_dict(peft_unet))
    assert sorted(loaded) == sorted(peft_state) == sorted(strip(adapter.state_dict))
    for key, tensor in peft_state.items():
        assert torch.equal(loaded[key], tensor), key
        assert torch.equal(tensor, adapter.state_dict[PEFT_PREFIX + key]), key

    with torch.no_grad():
        diffusers_output = pipe.unet(latents, timestep, text).sample
        peft_unet.set_adapter("default")
        peft_output = peft_unet(latents, timestep, text).sample
    assert (diffusers_output - base_output).abs().max() > 1e-3  # the LoRA changes the UNet
    torch.testing.assert_close(diffusers_output, peft_output, rtol=1e-5, atol=1e-6)  # ... at alpha / r, as PEFT

    # The pipeline runs end to end with the generated LoRA.
    image = pipe("a b", num_inference_steps=2, height=16, width=16, output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


def test_without_metadata_diffusers_would_rescale(saved_adapter, tmp_path):
    """The control that makes the scale check meaningful: the same tensors saved without lora_adapter_metadata load
    with lora_alpha = r and give another output."""
    adapter, folder = saved_adapter
    bare = tmp_path / "bare"
    StableDiffusionPipeline.save_lora_weights(bare, unet_lora_layers=strip(adapter.state_dict))
    latents, timestep, text = unet_inputs()
    outputs = []
    for source in (folder, bare):
        pipe = tiny_pipeline(tmp_path)
        pipe.load_lora_weights(source)
        with torch.no_grad():
            outputs.append(pipe.unet(latents, timestep, text).sample)
        alpha = pipe.unet.peft_config["default_0"].lora_alpha
    assert alpha == RANK  # diffusers' guess without metadata
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3


def test_generate_adapter_into_unet(unet_generator, saved_adapter):
    adapter, _ = saved_adapter
    peft_unet = unet_generator.generate_adapter("flip", seed=0, base_model=tiny_unet())
    assert isinstance(peft_unet, PeftModel)
    state = get_peft_model_state_dict(peft_unet)
    assert all(torch.equal(state[key], adapter.state_dict[key]) for key in adapter.state_dict)


def test_from_diffusers_rejects_other_models():
    with pytest.raises(UnsupportedAdapterError, match="UNet2DConditionModel"):
        LoraLayout.from_diffusers(torch.nn.Linear(2, 2))
    with pytest.raises(UnsupportedAdapterError, match="no LoRA adapter named"):
        LoraLayout.from_diffusers(tiny_unet())


def test_pushed_adapter_loads_with_load_lora_weights_from_the_hub(hub_env, saved_adapter, tmp_path):
    """A generated UNet LoRA pushed to the (local) Hub loads with `pipe.load_lora_weights("user/repo")` exactly like
    the local folder, and with plain PEFT too."""
    adapter, folder = saved_adapter
    adapter.push_to_hub("user/generated-unet-flip")
    assert {"adapter_config.json", "adapter_model.safetensors", DIFFUSERS_WEIGHTS_NAME} <= set(
        hub_env.list_files("user/generated-unet-flip")
    )
    latents, timestep, text = unet_inputs()
    outputs = []
    for source in ("user/generated-unet-flip", folder):
        pipe = tiny_pipeline(tmp_path)
        pipe.load_lora_weights(source, adapter_name="generated")
        assert pipe.unet.peft_config["generated"].lora_alpha == ALPHA
        with torch.no_grad():
            outputs.append(pipe.unet(latents, timestep, text).sample)
    peft_unet = PeftModel.from_pretrained(tiny_unet(), "user/generated-unet-flip")
    with torch.no_grad():
        outputs.append(peft_unet(latents, timestep, text).sample)
    assert torch.equal(outputs[0], outputs[1])
    torch.testing.assert_close(outputs[0], outputs[2], rtol=1e-5, atol=1e-6)
