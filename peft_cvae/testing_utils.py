"""Tiny random models built from configs in milliseconds, for tests and for the examples' offline `--quick` mode.

Like `transformers.testing_utils` and diffusers' tiny test configs: every builder seeds torch itself, so the same seed
gives the same weights, and nothing is downloaded. The models are random: they exercise the real PEFT, transformers
and diffusers code paths, not the quality of a generated LoRA.
"""

import torch

__all__ = [
    "tiny_bert",
    "tiny_clip_text_model",
    "tiny_llama",
    "tiny_stable_diffusion_pipeline",
    "tiny_unet",
    "tiny_vae",
]


def tiny_llama(seed: int = 0, vocab_size: int = 64, **config_overrides):
    """A 2-layer `LlamaForCausalLM` of hidden size 16 (in eval mode); `config_overrides` go to `LlamaConfig`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": vocab_size,
        "max_position_embeddings": 64,
    }
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**fields, **config_overrides})).eval()


def tiny_bert(vocab_size: int, seed: int = 0):
    """A 1-layer `BertModel` of hidden size 16 (in eval mode): a stand-in sentence encoder."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return BertModel(config).eval()


def tiny_clip_text_model(vocab_size: int, seed: int = 0, bos_token_id: int = 0, eos_token_id: int = 1):
    """A 1-layer `CLIPTextModel` of hidden size 8, the cross-attention width of `tiny_unet` (in eval mode)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def tiny_unet(seed: int = 0):
    """The smallest `UNet2DConditionModel` diffusers builds (DESIGN.md §4): 16x16 latents of 4 channels, text 8."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(4, 8),
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        sample_size=16,
    ).eval()


def tiny_vae(seed: int = 0):
    """A one-block `AutoencoderKL` with 4 latent channels (in eval mode)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(4,),
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        layers_per_block=1,
        sample_size=16,
    ).eval()


def tiny_stable_diffusion_pipeline(tokenizer, seed: int = 0):
    """A complete `StableDiffusionPipeline` of tiny random models around a given `CLIPTokenizer` (16x16 images)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_clip_text_model(len(tokenizer), seed, tokenizer.bos_token_id, tokenizer.eos_token_id),
        tokenizer=tokenizer,
        unet=tiny_unet(seed),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
