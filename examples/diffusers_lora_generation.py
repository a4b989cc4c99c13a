"""UNet LoRAs of a Stable Diffusion pipeline -> a generator -> a generated LoRA that `pipe.load_lora_weights` loads.

    python examples/diffusers_lora_generation.py --quick    # a pipeline of tiny random models: ~20 s on 2 CPU cores
    python examples/diffusers_lora_generation.py --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5   # needs a GPU

Needs `pip install "peft-cvae[diffusers]"`. Steps:

1. For each "style" (made-up picture families: red squares, stripes, checkerboards), train a LoRA on the pipeline's
   UNet the way diffusers' `train_text_to_image_lora.py` does: `unet.add_adapter(LoraConfig(...))`, then the
   denoising loss on the style's images with their caption. The LoRA of the last third of training is copied into a
   `LoraBank` every few steps; `LoraLayout.from_diffusers(unet)` gives the layout, marked `library="diffusers"`.
2. Embed each style's caption with a `TextTaskEncoder` and train a `PeftCVAEGenerator` on the bank.
3. Generate a LoRA for a training style and for a new description. `save_pretrained` writes PEFT's files and
   diffusers' `pytorch_lora_weights.safetensors` with the LoRA config as `lora_adapter_metadata`, so
   `pipe.load_lora_weights(folder)` loads it at its real scale (lora_alpha / r; here alpha = 2r, which diffusers would
   silently lose without the metadata).
4. Load it with `pipe.load_lora_weights`, check the UNet holds exactly the generated tensors with the right
   lora_alpha, and sample an image with and without it.

Text-encoder LoRAs are not supported: peft-cvae generates UNet LoRAs only.

Real mode downloads the pipeline from the Hub (or reads a local folder) and trains at 256 x 256 pixels: 3 x 150 LoRA
steps take a few minutes on one GPU and far too long on a CPU. `--quick` runs the same code on tiny random models.
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from peft import LoraConfig

from peft_cvae import LoraBank, LoraLayout, PeftCVAEGenerator, TextTaskEncoder, train_generator
from peft_cvae.diffusers_utils import DIFFUSERS_WEIGHTS_NAME, get_diffusers_lora_state_dict

STYLES = {
    "red": "a plain red square",
    "stripes": "black and white vertical stripes",
    "checkers": "a black and white checkerboard",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a pipeline of tiny random models, in seconds")
    parser.add_argument("--pipeline", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="Hub id or folder")
    parser.add_argument("--output", default="~/.cache/peft_cvae/examples/diffusers", help="folder for the results")
    parser.add_argument("--resolution", type=int, default=256, help="training image size in pixels")
    parser.add_argument("--steps", type=int, default=150, help="LoRA training steps per style")
    parser.add_argument("--epochs", type=int, default=300, help="generator training epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.resolution, args.steps, args.epochs = 16, 9, 60
    return args


def style_images(style: str, size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` images (count, 3, size, size) in [-1, 1] of one style, with random offsets and a little noise."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = []
    for _ in range(count):
        shift = int(torch.randint(0, size, (1,), generator=generator))
        if style == "red":
            image = torch.stack([torch.ones(size, size), -torch.ones(size, size), -torch.ones(size, size)])
        else:
            period = max(2, size // 8)
            on = ((x + shift) // period) % 2 if style == "stripes" else ((x + shift) // period + y // period) % 2
            image = (on.float() * 2 - 1).expand(3, size, size)
        images.append(image + 0.05 * torch.randn(3, size, size, generator=generator))
    return torch.stack(images).clamp(-1, 1)


def train_style_lora(pipe, style: str, args, bank: LoraBank | None) -> LoraBank:
    """Denoising-loss LoRA training on one style, as diffusers' train_text_to_image_lora.py; returns the bank."""
    unet, device = pipe.unet, pipe.device
    if "default" in getattr(unet, "peft_config", {}):
        unet.delete_adapters("default")  # start every style from the same initialisation
    torch.manual_seed(0)
    unet.add_adapter(
        LoraConfig(
            r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
        )
    )
    if bank is None:
        bank = LoraBank(LoraLayout.from_diffusers(unet))  # layout.library == "diffusers"
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2 if args.quick else 1e-4)
    tokens = pipe.tokenizer(
        STYLES[style],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    with torch.no_grad():
        text_states = pipe.text_encoder(tokens)[0]  # (1, 77, hidden)
    data = torch.Generator().manual_seed(1)
    first_kept, every = args.steps - args.steps // 3 + 1, max(1, args.steps // 15)
    unet.train()
    for step in range(1, args.steps + 1):
        images = style_images(style, args.resolution, 4, data).to(device, pipe.vae.dtype)
        with torch.no_grad():
            latents = pipe.vae.encode(images).latent_dist.sample() * pipe.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, text_states.expand(len(latents), -1, -1)).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= first_kept and (step % every == 0 or step == args.steps):
            bank.add_checkpoint(style, get_diffusers_lora_state_dict(unet), step=step)
    unet.eval()
    print(f"{style}: loss {loss.item():.4f} at step {args.steps}; {len(bank.checkpoints_of(style))} checkpoints kept")
    return bank


def sample(pipe, prompt: str, args) -> torch.Tensor:
    """One image (1, 3, H, W) at the pipeline's default size, from a fixed seed."""
    generator = torch.Generator().manual_seed(0)
    steps = 2 if args.quick else 25
    return pipe(prompt, num_inference_steps=steps, generator=generator, output_type="pt").images


def main(argv=None) -> dict:
    args = parse_args(argv)
    output = Path(args.output).expanduser()
    if args.quick:
        from quick_assets import quick_words

        from peft_cvae.testing_utils import (
            save_tiny_clip_tokenizer,
            save_tiny_text_encoder,
            tiny_stable_diffusion_pipeline,
        )

        tokenizer = save_tiny_clip_tokenizer(output / "tiny-tokenizer", quick_words())
        tiny_stable_diffusion_pipeline(tokenizer).save_pretrained(output / "tiny-pipeline")
        pipe = StableDiffusionPipeline.from_pretrained(output / "tiny-pipeline")  # as a real checkpoint loads
        task_encoder = TextTaskEncoder(save_tiny_text_encoder(output / "text-encoder", words=quick_words()))
    else:
        pipe = StableDiffusionPipeline.from_pretrained(args.pipeline, safety_checker=None)  # float32: LoRA training
        pipe.to("cuda" if torch.cuda.is_available() else "cpu")
        task_encoder = TextTaskEncoder()  # all-MiniLM-L6-v2
    pipe.set_progress_bar_config(disable=True)

    # 1. A bank of UNet LoRAs, one training run per style.
    bank = None
    for style in STYLES:
        bank = train_style_lora(pipe, style, args, bank)
    pipe.unet.delete_adapters("default")  # back to the plain UNet
    bank.encode_conditions(task_encoder, STYLES)  # the captions are the task descriptions
    bank.save_pretrained(output / "bank")

    # 2. The generator.
    sizes = {"hidden_channels": 32, "latent_size": 8, "num_layers": 2, "patch_size": 16} if args.quick else {}
    generator = PeftCVAEGenerator.from_bank(bank, **sizes)
    history = train_generator(
        generator,
        bank,
        epochs=args.epochs,
        lr=3e-3 if args.quick else 1e-3,
        batch_size=8,
        output_dir=output / "generator",
        show_progress=not args.quick,
    )
    losses = f"{history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}"
    print(f"Generator: {generator.num_parameters():,} parameters, loss {losses}")

    # 3. Generated LoRAs: a training style by name, and a new description through the recorded text encoder.
    before = sample(pipe, "stripes", args)
    results = {}
    for name, task in {"stripes": "stripes", "new": "thin black and white stripes"}.items():
        adapter = generator.generate_adapter(task, seed=0, temperature=0)
        folder = output / "generated" / name
        adapter.save_pretrained(folder)
        files = sorted(path.name for path in folder.iterdir())

        # 4. Load it the diffusers way and check what the UNet got.
        pipe.load_lora_weights(folder, weight_name=DIFFUSERS_WEIGHTS_NAME, adapter_name=name)
        loaded = get_diffusers_lora_state_dict(pipe.unet, adapter_name=name)
        same = all(
            torch.equal(loaded[key].cpu().float(), adapter.state_dict[key].float()) for key in adapter.state_dict
        )
        alpha = pipe.unet.peft_config[name].lora_alpha
        after = sample(pipe, "stripes", args)
        change = (after - before).abs().mean().item()
        print(
            f"{name}: {folder} holds {files}; load_lora_weights: same tensors {same}, lora_alpha {alpha}, "
            f"mean image change {change:.4f}"
        )
        pipe.delete_adapters(name)
        results[name] = {"folder": folder, "files": files, "same_tensors": same, "lora_alpha": alpha, "change": change}
    return results


if __name__ == "__main__":
    main()
