"""Diffusion LoRAs in the wild: Kohya/A1111 `.safetensors` files and diffusers files without `lora_adapter_metadata`,
read into a bank by diffusers' own converters, with the alpha carried so that the UNet computes what diffusers'
`load_lora_weights` of the same file computes.

Fixtures are real files: a LoRA added to a tiny UNet (SD 1.x from DESIGN §4, and an SDXL-shaped one) with random
A and B, written in Kohya's key form by diffusers' own `convert_state_dict_to_kohya`, alphas then set per module. That
diffusers' loader accepts every file and injects every module is checked, which proves the format.
"""

import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: E402
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya  # noqa: E402
from peft import LoraConfig, PeftModel  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from peft_cvae import (  # noqa: E402
    CorruptFileError,
    LayoutMismatchError,
    LoraBank,
    PeftCVAEGenerator,
    UnsupportedAdapterError,
    train_generator,
)
from peft_cvae.adapter_io import load_adapter  # noqa: E402
from peft_cvae.diffusers_lora_files import load_diffusers_lora  # noqa: E402
from peft_cvae.diffusers_utils import DIFFUSERS_WEIGHTS_NAME, PEFT_PREFIX, save_diffusers_lora_weights  # noqa: E402
from peft_cvae.testing_utils import (  # noqa: E402
    save_tiny_clip_tokenizer,
    tiny_sdxl_unet,
    tiny_stable_diffusion_pipeline,
    tiny_unet,
)
from tests.testing_utils import small_generator_overrides  # noqa: E402

RANK = 2
# Attention, transformer projections and feed-forward, and (LoCon) the resnets' convolutions and time projections.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
SDXL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def peft_lora_state(make_unet, seed: int, targets=TARGETS, rank_pattern=None) -> dict[str, torch.Tensor]:
    """A random LoRA (A and B both non-zero, as after training) on a fresh UNet, in PEFT's saved form."""
    unet = make_unet()
    torch.manual_seed(seed)
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets, rank_pattern=rank_pattern or {})
    unet.add_adapter(LoraConfig(**{**config.to_dict(), "init_lora_weights": False}))
    return {key: tensor.detach().clone() for key, tensor in get_peft_model_state_dict(unet).items()}


def write_kohya(path, state: dict[str, torch.Tensor], alpha=6.0, rename=None, extra=None):
    """Write `state` as a Kohya/A1111 file; `alpha` is a number or `alpha(kohya module name) -> number`."""
    kohya = convert_state_dict_to_kohya({f"unet.{key}": tensor for key, tensor in state.items()})
    for key in [key for key in kohya if key.endswith(".alpha")]:
        kohya[key] = torch.tensor(float(alpha(key.removesuffix(".alpha")) if callable(alpha) else alpha))
    if rename is not None:
        kohya = {rename(key): tensor for key, tensor in kohya.items()}
    kohya.update(extra or {})
    assert all(key.startswith("lora_unet_") for key in kohya if key not in (extra or {}))
    save_file({key: tensor.contiguous() for key, tensor in kohya.items()}, str(path))
    return path


def unet_inputs(sdxl: bool = False, seed: int = 0):
    """Arguments of the UNet's forward: latents (2, 4, 16, 16), timestep, text (2, 5, 8 or 16), SDXL's extras."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 5, 16 if sdxl else 8, generator=generator)
    kwargs = {}
    if sdxl:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 32, generator=generator),
            "time_ids": torch.randn(2, 6, generator=generator),
        }
    return (latents, torch.tensor(10), text), kwargs


def run(unet, sdxl: bool = False) -> torch.Tensor:
    args, kwargs = unet_inputs(sdxl)
    with torch.no_grad():
        return unet(*args, **kwargs).sample


def diffusers_output(source, pipe_class=StableDiffusionPipeline, make_unet=tiny_unet, sdxl=False):
    """The UNet's output after diffusers' own loading of `source` (what `load_lora_weights` does for the UNet:
    `lora_state_dict(..., unet_config=unet.config)` then `load_lora_into_unet`); also the loaded adapter state."""
    unet = make_unet()
    state, alphas, metadata = pipe_class.lora_state_dict(
        str(source), unet_config=unet.config, return_lora_metadata=True
    )
    pipe_class.load_lora_into_unet(state, alphas, unet, metadata=metadata, adapter_name="loaded")
    return run(unet, sdxl), get_peft_model_state_dict(unet, adapter_name="loaded")


def our_output(config, state, folder, pipe_class=StableDiffusionPipeline, make_unet=tiny_unet, sdxl=False):
    """The UNet's output after loading OUR converted adapter, written as peft-cvae writes generated ones."""
    save_diffusers_lora_weights(state, config, folder)
    return diffusers_output(folder, pipe_class, make_unet, sdxl)


def strip(state):
    return {key.removeprefix(PEFT_PREFIX): tensor for key, tensor in state.items()}


# ---- Kohya files of Stable Diffusion 1.x ----------------------------------------------------------------------------
def test_kohya_alpha_not_rank_matches_load_lora_weights(tmp_path):
    """The decisive check: alpha = 6 != rank = 2 everywhere, LoRAs on attention, feed-forward, projections and (LoCon)
    3x3 convolutions. Our adapter gives the UNet the output `pipe.load_lora_weights(file)` gives it."""
    state = peft_lora_state(tiny_unet, seed=0)
    file = write_kohya(tmp_path / "style.safetensors", state, alpha=6.0)
    config, converted = load_diffusers_lora(file)
    # alpha / rank = 3 went into lora_B; the config says scale 1
    assert config["r"] == config["lora_alpha"] == RANK and config["alpha_pattern"] == {}
    assert sorted(strip(converted)) == sorted(state)
    for key, tensor in state.items():
        factor = 3.0 if "lora_B" in key else 1.0
        torch.testing.assert_close(converted[PEFT_PREFIX + key], tensor * factor)

    pipe = tiny_stable_diffusion_pipeline(save_tiny_clip_tokenizer(tmp_path / "tok", words=("a", "b")))
    base = run(pipe.unet)
    pipe.load_lora_weights(str(file), adapter_name="kohya")  # diffusers' own loading of the very file
    assert pipe.unet.peft_config["kohya"].lora_alpha == 6.0
    reference = run(pipe.unet)
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="kohya")
    assert len(loaded) == len(state)  # diffusers accepted every module of the file: the key format is Kohya's

    ours, our_loaded = our_output(config, converted, tmp_path / "ours")
    assert sorted(our_loaded) == sorted(loaded)
    assert (reference - base).abs().max() > 1e-2  # the LoRA matters
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-5), (ours - reference).abs().max()
    # the control: dropping the alpha (scale 1 instead of 3) gives another output
    wrong = write_kohya(tmp_path / "alpha-is-rank.safetensors", state, alpha=RANK)
    assert not torch.allclose(diffusers_output(wrong)[0], reference, rtol=1e-3, atol=1e-3)


def test_kohya_per_module_alphas_and_ranks(tmp_path):
    """Per-module alphas on projections, feed-forward and convolutions, and rank 4 on the convolutions (LoCon's
    conv_dim): diffusers carries these (alpha_pattern, rank_pattern), and our adapter, with every module's
    alpha / rank folded into its lora_B, gives the same output."""
    state = peft_lora_state(tiny_unet, seed=1, rank_pattern={"conv1": 4, "conv2": 4})

    def alpha(module):
        return 1.0 if "conv" in module else 0.5 if "ff_net" in module else 3.0 if "proj_in" in module else 6.0

    file = write_kohya(tmp_path / "mixed.safetensors", state, alpha=alpha)
    config, converted = load_diffusers_lora(file)
    assert config["r"] == config["lora_alpha"] == RANK
    assert config["rank_pattern"] == config["alpha_pattern"] and set(config["rank_pattern"].values()) == {4}
    reference, loaded = diffusers_output(file)
    assert len(loaded) == len(state)
    ours, _ = our_output(config, converted, tmp_path / "ours")
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-5), (ours - reference).abs().max()


def test_kohya_attention_alphas_that_diffusers_loses(tmp_path):
    """diffusers names the alphas of attention projections `...attn1.processor.to_q_lora.down.weight.alpha`, which
    `get_peft_kwargs` never matches to a module: when they differ from the rest, `load_lora_weights` uses the most
    common alpha there (peft warns it ignored those alpha_pattern keys). We convert module by module and keep Kohya's
    alpha / rank: our output equals diffusers' on the same LoRA with the alphas folded into lora_up by hand."""
    state = peft_lora_state(tiny_unet, seed=2)
    file = write_kohya(tmp_path / "q-alpha.safetensors", state, alpha=lambda m: 1.0 if m.endswith("to_q") else 6.0)
    config, converted = load_diffusers_lora(file)

    folded = load_file(str(file))  # the same LoRA, Kohya semantics made explicit: up * alpha / rank, alpha = rank
    for key in [key for key in folded if key.endswith(".alpha")]:
        module = key.removesuffix(".alpha")
        rank = folded[f"{module}.lora_down.weight"].shape[0]
        folded[f"{module}.lora_up.weight"] = folded[f"{module}.lora_up.weight"] * (folded[key].item() / rank)
        folded[key] = torch.tensor(float(rank))
    save_file(folded, str(tmp_path / "folded.safetensors"))
    reference, _ = diffusers_output(tmp_path / "folded.safetensors")

    ours, _ = our_output(config, converted, tmp_path / "ours")
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-5), (ours - reference).abs().max()
    with pytest.warns(RuntimeWarning, match="alpha_pattern keys did not match"):
        diffusers_direct, _ = diffusers_output(file)
    assert not torch.allclose(diffusers_direct, reference, rtol=1e-3, atol=1e-3)  # diffusers' scale 3 on to_q


def test_kohya_text_encoder_parts_are_left_out_with_a_warning(tmp_path):
    state = peft_lora_state(tiny_unet, seed=3, targets=["to_q", "to_v"])
    text_encoder = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(RANK, 8),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(8, RANK),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(1.0),
    }
    plain = write_kohya(tmp_path / "unet-only.safetensors", state)
    both = write_kohya(tmp_path / "with-te.safetensors", state, extra=text_encoder)
    with pytest.warns(UserWarning, match="left out 3 text-encoder LoRA tensors"):
        config, converted = load_diffusers_lora(both)
    expected_config, expected = load_diffusers_lora(plain)
    assert config == expected_config and all(torch.equal(converted[key], expected[key]) for key in expected)


def test_kohya_refusals(tmp_path):
    state = peft_lora_state(tiny_unet, seed=4, targets=["to_q"])
    kohya = convert_state_dict_to_kohya({f"unet.{key}": tensor for key, tensor in state.items()})
    module = next(key for key in kohya if key.endswith(".alpha")).removesuffix(".alpha")
    cases = {
        "loha": ({f"{module}.hada_w1_a": torch.randn(2, 2)}, "LyCORIS"),
        "dora": ({f"{module}.dora_scale": torch.randn(1, 4)}, "DoRA"),
        "tucker": ({f"{module}.lora_mid.weight": torch.randn(2, 2, 3, 3)}, "LyCORIS"),
    }
    for name, (extra, message) in cases.items():
        save_file({**kohya, **extra}, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(UnsupportedAdapterError, match=message):
            load_diffusers_lora(tmp_path / f"{name}.safetensors")
    torch.save(kohya, tmp_path / "pickled.ckpt")
    with pytest.raises(UnsupportedAdapterError, match="safetensors only"):
        load_diffusers_lora(tmp_path / "pickled.ckpt")
    save_file({f"{module}.lora_down.weight": kohya[f"{module}.lora_down.weight"]}, str(tmp_path / "half.safetensors"))
    with pytest.raises(CorruptFileError, match="without both lora_down and lora_up"):
        load_diffusers_lora(tmp_path / "half.safetensors")


# ---- diffusers files without metadata -------------------------------------------------------------------------------
def test_diffusers_file_without_metadata_reads_as_alpha_equals_rank(tmp_path):
    """diffusers assumes lora_alpha = r for such a file; so does peft-cvae, and says so."""
    state = peft_lora_state(tiny_unet, seed=5, rank_pattern={"conv1": 4})
    folder = tmp_path / "bare"
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state)  # no unet_lora_adapter_metadata
    with pytest.warns(UserWarning, match="no lora_adapter_metadata"):
        config, converted = load_diffusers_lora(folder)
    assert config["r"] == config["lora_alpha"] == RANK and config["alpha_pattern"] == config["rank_pattern"] != {}
    assert all(torch.equal(converted[PEFT_PREFIX + key], tensor) for key, tensor in state.items())
    reference, loaded = diffusers_output(folder / DIFFUSERS_WEIGHTS_NAME)
    assert len(loaded) == len(state)
    ours, _ = our_output(config, converted, tmp_path / "ours")
    assert torch.equal(ours, reference)


# ---- SDXL -----------------------------------------------------------------------------------------------------------
def to_sgm_names(key: str, layers_per_block: int = 2) -> str:
    """Kohya's SDXL naming (sd-scripts trains SDXL on the original UNet, whose blocks are input_blocks.N.M,
    middle_block.M, output_blocks.N.M): the inverse of diffusers' `_maybe_map_sgm_blocks_to_diffusers`, for
    attention blocks. That diffusers maps these names back onto every module of the UNet is checked below."""
    step = layers_per_block + 1
    key = re.sub(
        r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_",
        lambda m: f"lora_unet_input_blocks_{1 + int(m[1]) * step + int(m[2])}_1_",
        key,
    )
    key = re.sub(r"lora_unet_mid_block_attentions_0_", "lora_unet_middle_block_1_", key)
    return re.sub(
        r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_",
        lambda m: f"lora_unet_output_blocks_{int(m[1]) * step + int(m[2])}_1_",
        key,
    )


@pytest.mark.parametrize("naming", ["diffusers", "sgm"])
def test_kohya_sdxl_matches_load_lora_weights(tmp_path, naming):
    """SDXL Kohya files, with diffusers' block names or the original ones (which need the UNet's config, exactly as
    `StableDiffusionXLPipeline.load_lora_weights` passes `unet_config=self.unet.config`)."""
    state = peft_lora_state(tiny_sdxl_unet, seed=6, targets=SDXL_TARGETS)
    rename = to_sgm_names if naming == "sgm" else None
    file = write_kohya(
        tmp_path / "sdxl.safetensors", state, alpha=lambda m: 1.0 if "ff_net" in m else 4.0, rename=rename
    )
    if naming == "sgm":
        assert any("input_blocks_4_1_transformer_blocks_1" in key for key in load_file(str(file)))
        with pytest.raises(UnsupportedAdapterError, match="unet_config"):
            load_diffusers_lora(file)
    unet_config = tiny_sdxl_unet().config
    config, converted = load_diffusers_lora(file, unet_config=unet_config)
    assert sorted(strip(converted)) == sorted(state)
    reference, loaded = diffusers_output(file, StableDiffusionXLPipeline, tiny_sdxl_unet, sdxl=True)
    assert sorted(loaded) == sorted(state)  # diffusers injected every module: the names are right
    ours, _ = our_output(config, converted, tmp_path / "ours", StableDiffusionXLPipeline, tiny_sdxl_unet, sdxl=True)
    assert (reference - run(tiny_sdxl_unet(), sdxl=True)).abs().max() > 1e-3
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-5), (ours - reference).abs().max()
    # a plain dict config works too (diffusers reads it as attributes)
    again, _ = load_diffusers_lora(file, unet_config=dict(unet_config))
    assert again == config


# ---- a bank of files from the wild, and generated adapters ----------------------------------------------------------
@pytest.fixture(scope="module")
def wild_files(tmp_path_factory):
    """Two tasks, three files each: Kohya files of different alphas (1, 4, 8) and a metadata-less diffusers file.
    Each task's LoRAs share a direction (its mean), checkpoints differ by noise."""
    folder = tmp_path_factory.mktemp("wild")
    files = {}
    for index, task in enumerate(("ink", "neon")):
        mean = peft_lora_state(tiny_unet, seed=10 + index, targets=["to_q", "to_v", "proj_in", "conv1"])
        noise = torch.Generator().manual_seed(index)
        files[task] = []
        for copy, alpha in enumerate((1.0, 4.0, 8.0, None)):
            # stored so that the effective LoRA (alpha / rank * B @ A) is the task's mean plus noise
            state = {key: tensor + 0.05 * torch.randn(tensor.shape, generator=noise) for key, tensor in mean.items()}
            if alpha is None:
                StableDiffusionPipeline.save_lora_weights(folder / f"{task}-{copy}", unet_lora_layers=state)
                files[task].append(folder / f"{task}-{copy}")
                continue
            state = {key: tensor * (RANK / alpha if "lora_B" in key else 1.0) for key, tensor in state.items()}
            files[task].append(write_kohya(folder / f"{task}-{copy}.safetensors", state, alpha=alpha))
    return files


def test_bank_from_wild_files_to_generated_adapter(wild_files, tmp_path):
    with pytest.warns(UserWarning, match="no lora_adapter_metadata"):
        bank = LoraBank.from_adapters(wild_files)
    assert bank.layout.library == "diffusers" and len(bank) == 8
    assert bank.layout.lora_config["r"] == bank.layout.lora_config["lora_alpha"] == RANK
    # the alphas were different per file; folded into B, a task's checkpoints agree again
    layout = bank.layout
    for task in bank.task_names:
        vectors = torch.stack([layout.flatten(c.state_dict) for c in bank.checkpoints_of(task)])
        assert (vectors - vectors.mean(0)).norm(dim=1).max() < 0.3 * vectors.mean(0).norm()
    bank.set_condition("ink", torch.tensor([1.0, 0.0]))
    bank.set_condition("neon", torch.tensor([0.0, 1.0]))
    # The plain decoder: the check is that the network learns these LoRAs (with task memory the means already do).
    generator = PeftCVAEGenerator.from_bank(bank, task_memory=False, **small_generator_overrides())
    history = train_generator(generator, bank, epochs=40, lr=3e-3, batch_size=4, show_progress=False)
    assert history[-1]["reconstruction_loss"] < history[0]["reconstruction_loss"]
    adapter = generator.eval().generate_adapter("neon", seed=0)
    folder = tmp_path / "neon-lora"
    adapter.save_pretrained(folder)

    pipe = tiny_stable_diffusion_pipeline(save_tiny_clip_tokenizer(tmp_path / "tok", words=("a", "b")))
    pipe.load_lora_weights(folder, adapter_name="generated")
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="generated")
    assert sorted(loaded) == sorted(strip(adapter.state_dict))  # nothing missing, nothing unexpected
    assert all(torch.equal(loaded[key], adapter.state_dict[PEFT_PREFIX + key]) for key in loaded)
    assert pipe.unet.peft_config["generated"].lora_alpha == RANK
    peft_unet = PeftModel.from_pretrained(tiny_unet(), folder)
    result = peft_unet.load_adapter(folder, adapter_name="check")
    assert [key for key in result.missing_keys if "lora_" in key] == [] and result.unexpected_keys == []
    torch.testing.assert_close(run(pipe.unet), run(peft_unet), rtol=1e-5, atol=1e-6)
    image = pipe("a b", num_inference_steps=2, height=16, width=16, output_type="pt").images
    assert torch.isfinite(image).all()


def test_sdxl_generated_adapter_loads_into_the_sdxl_unet(tmp_path):
    unet_config = tiny_sdxl_unet().config
    files = {}
    for task, seed in (("a", 20), ("b", 21)):
        state = peft_lora_state(tiny_sdxl_unet, seed=seed, targets=["to_q", "to_k", "ff.net.2"])
        kohya = write_kohya(tmp_path / f"{task}.safetensors", state, alpha=1.0, rename=to_sgm_names)
        files[task] = [kohya]
    bank = LoraBank.from_adapters(files, conditions={"a": torch.zeros(2), "b": torch.ones(2)}, unet_config=unet_config)
    generator = PeftCVAEGenerator.from_bank(bank, **small_generator_overrides())
    train_generator(generator, bank, epochs=5, lr=3e-3, batch_size=2, show_progress=False)
    adapter = generator.eval().generate_adapter("b", seed=0)
    adapter.save_pretrained(tmp_path / "generated")
    unet = tiny_sdxl_unet()
    unet.load_lora_adapter(
        tmp_path / "generated", weight_name=DIFFUSERS_WEIGHTS_NAME, prefix="unet", adapter_name="generated"
    )
    loaded = get_peft_model_state_dict(unet, adapter_name="generated")
    assert sorted(loaded) == sorted(strip(adapter.state_dict))
    assert all(torch.equal(loaded[key], adapter.state_dict[PEFT_PREFIX + key]) for key in loaded)
    assert torch.isfinite(run(unet, sdxl=True)).all()


def test_bank_refuses_mixing_ranks_and_reads_single_files(wild_files, tmp_path):
    other_rank = peft_lora_state(tiny_unet, seed=30, targets=["to_q", "to_v", "proj_in", "conv1"])
    other_rank = {
        key: torch.cat([tensor, tensor], dim=0 if "lora_A" in key else 1) for key, tensor in other_rank.items()
    }
    file = write_kohya(tmp_path / "rank4.safetensors", other_rank, alpha=4.0)
    with pytest.raises(LayoutMismatchError):
        LoraBank.from_adapters({"ink": wild_files["ink"][:1], "other": [file]})
    config, state = load_adapter(wild_files["ink"][0])  # a single .safetensors file is an adapter path too
    assert config["r"] == RANK and all(key.startswith(PEFT_PREFIX) for key in state)


def test_unet_config_checks_the_file_fits_the_unet(tmp_path):
    """Given the UNet's config, each converted module must exist there with matching features: an SD 1.x LoRA read
    for SDXL is refused at once, not when a generated adapter is loaded."""
    state = peft_lora_state(tiny_unet, seed=40, targets=["to_q", "conv1"])
    file = write_kohya(tmp_path / "sd1.safetensors", state, alpha=1.0)
    config, converted = load_diffusers_lora(file, unet_config=tiny_unet().config)
    assert sorted(strip(converted)) == sorted(state)
    with pytest.raises(LayoutMismatchError, match="another model"):
        load_diffusers_lora(file, unet_config=tiny_sdxl_unet().config)
    wider = dict(tiny_unet().config, block_out_channels=(8, 16), cross_attention_dim=16)  # same names, other sizes
    with pytest.raises(LayoutMismatchError, match="features but the given UNet's module has"):
        load_diffusers_lora(file, unet_config=wider)
