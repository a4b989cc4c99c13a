"""Tiny random models and tokenizers built in milliseconds, for tests and for the examples' offline `--quick` mode.

Like `transformers.testing_utils` and diffusers' tiny test configs: every builder seeds torch itself, so the same seed
gives the same weights, and nothing is downloaded. The models are random: they exercise the real PEFT, transformers
and diffusers code paths, not the quality of a generated LoRA. The `save_tiny_*` builders write a folder that loads
with `from_pretrained` (model and tokenizer), for code that takes a path, as users' code does.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "TINY_CAUSAL_LM_FAMILIES",
    "TINY_WORDS",
    "TinyCausalLMFamily",
    "save_tiny_causal_lm",
    "save_tiny_clip_tokenizer",
    "save_tiny_text_encoder",
    "tiny_bpe_tokenizer",
    "tiny_bert",
    "tiny_causal_lm",
    "tiny_clip_text_model",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_stable_diffusion_pipeline",
    "tiny_unet",
    "tiny_vae",
]

TINY_WORDS = tuple(
    (
        "football match report sport news python source code the a of tokens sequences follow ascending descending "
        "repeating pattern up down again numbers count"
    ).split()
)
"""The default vocabulary of the tiny tokenizers: the words the tests' descriptions and examples use."""


@dataclass(frozen=True)
class TinyCausalLMFamily:
    """One causal-LM architecture at test size, like diffusers' tiny test configs: how to build it, and which of its
    modules a LoRA on the attention targets. The families differ where peft-cvae could break: fused projections
    (Phi-3's `qkv_proj`), GPT-2's `Conv1D` whose weight is stored transposed (`c_attn`, `fan_in_fan_out=True`),
    grouped-query attention (fewer key/value heads, so `v_proj` is narrower than `q_proj`), attention biases (Qwen2),
    query/key norms and a head size that is not hidden / heads (Qwen3, Gemma3), sliding-window layers (Mistral,
    Gemma3) and a config nested in a text config (Gemma3's `get_text_config()`)."""

    name: str
    config_class: str  # a transformers class name, imported when the model is built
    model_class: str
    config: dict = field(default_factory=dict)
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    fan_in_fan_out: bool = False  # GPT-2's Conv1D stores (in, out): PEFT must be told

    def build(self, seed: int = 0, vocab_size: int = 64, **config_overrides):
        """The random model (in eval mode); the same seed gives the same weights."""
        import transformers

        config = getattr(transformers, self.config_class)(
            **{**self.config, "vocab_size": vocab_size, **config_overrides}
        )
        torch.manual_seed(seed)
        return getattr(transformers, self.model_class)(config).eval()

    def lora_config(self, r: int = 2, **overrides):
        """A `LoraConfig` on this family's attention targets (alpha 2 r)."""
        from peft import LoraConfig

        fields = {
            "r": r,
            "lora_alpha": 2 * r,
            "target_modules": list(self.lora_targets),
            "fan_in_fan_out": self.fan_in_fan_out,
            "task_type": "CAUSAL_LM",
        }
        return LoraConfig(**{**fields, **overrides})


_TINY_SIZES = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
_TINY_SIZES["max_position_embeddings"] = 64
TINY_CAUSAL_LM_FAMILIES = {
    family.name: family
    for family in (
        TinyCausalLMFamily("llama", "LlamaConfig", "LlamaForCausalLM", {**_TINY_SIZES, "num_key_value_heads": 2}),
        TinyCausalLMFamily(  # Gemma-3's text model (270M and 1B are text-only); the first layer slides over 4 tokens
            "gemma3",
            "Gemma3TextConfig",
            "Gemma3ForCausalLM",
            {**_TINY_SIZES, "num_key_value_heads": 1, "head_dim": 8, "sliding_window": 4, "layer_types": None},
        ),
        TinyCausalLMFamily("qwen2", "Qwen2Config", "Qwen2ForCausalLM", {**_TINY_SIZES, "num_key_value_heads": 1}),
        TinyCausalLMFamily(
            "qwen3", "Qwen3Config", "Qwen3ForCausalLM", {**_TINY_SIZES, "num_key_value_heads": 1, "head_dim": 4}
        ),
        TinyCausalLMFamily(
            "mistral", "MistralConfig", "MistralForCausalLM", {**_TINY_SIZES, "num_key_value_heads": 1}
        ),
        TinyCausalLMFamily(  # fused q, k, v in one Linear; the default pad id 32000 is beyond a tiny vocabulary
            "phi3",
            "Phi3Config",
            "Phi3ForCausalLM",
            {**_TINY_SIZES, "num_key_value_heads": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
            lora_targets=("qkv_proj",),
        ),
        TinyCausalLMFamily(
            "gpt2",
            "GPT2Config",
            "GPT2LMHeadModel",
            {"n_positions": 64, "n_embd": 16, "n_layer": 2, "n_head": 2, "bos_token_id": 0, "eos_token_id": 0},
            lora_targets=("c_attn",),
            fan_in_fan_out=True,
        ),
    )
}
"""Every tiny causal-LM family the tests cover, by name (`tiny_causal_lm(name)` builds one)."""


def tiny_causal_lm(family: str = "llama", seed: int = 0, vocab_size: int = 64, **config_overrides):
    """A 2-layer causal LM of width 16 of one of `TINY_CAUSAL_LM_FAMILIES` (in eval mode)."""
    if family not in TINY_CAUSAL_LM_FAMILIES:
        raise ValueError(f"Unknown tiny family {family!r}; choose one of {sorted(TINY_CAUSAL_LM_FAMILIES)}.")
    return TINY_CAUSAL_LM_FAMILIES[family].build(seed, vocab_size, **config_overrides)


def tiny_llama(seed: int = 0, vocab_size: int = 64, **config_overrides):
    """A 2-layer `LlamaForCausalLM` of hidden size 16 (in eval mode); `config_overrides` go to `LlamaConfig`."""
    return tiny_causal_lm("llama", seed, vocab_size, **config_overrides)


def tiny_llama_for(tokenizer, seed: int = 0, **config_overrides):
    """`tiny_llama` sized for `tokenizer` (e.g. `tiny_bpe_tokenizer`'s): its vocabulary and bos/eos/pad token ids."""
    return tiny_llama(
        seed,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config_overrides,
    )


def tiny_gpt2(seed: int = 0, vocab_size: int = 64):
    """A 2-layer `GPT2LMHeadModel` of width 16 (in eval mode): a causal LM that is not Llama-shaped."""
    return tiny_causal_lm("gpt2", seed, vocab_size)


def tiny_bert(vocab_size: int, seed: int = 0, max_position_embeddings: int = 64):
    """A 1-layer `BertModel` of hidden size 16 (in eval mode): a stand-in sentence encoder."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=max_position_embeddings,
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


def tiny_sdxl_unet(seed: int = 0):
    """A tiny UNet shaped like Stable Diffusion XL's (as diffusers' own SDXL tests build it): two blocks of
    `layers_per_block=2` (SDXL's), attention only in the second with two transformer layers, linear projections, and
    `addition_embed_type="text_time"`. Inputs: 16x16 latents of 4 channels, text (B, L, 16) and `added_cond_kwargs`
    `{"text_embeds": (B, 32), "time_ids": (B, 6)}`."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + 32 pooled text
        cross_attention_dim=16,
        norm_num_groups=4,
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


def save_tiny_clip_tokenizer(folder: str | Path, words=TINY_WORDS):
    """Write a `CLIPTokenizer` (vocab.json, no merges) whose vocabulary is the special tokens and `words`; return it.

    Without merges, CLIP's BPE keeps a one-character word whole (`a</w>`) and splits longer ones into characters, so
    each word is in the vocabulary both ways (`word</w>`, `word`); text of other words becomes `<|endoftext|>`.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for token in [word + "</w>" for word in words] + list(words):
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def save_tiny_text_encoder(
    folder: str | Path, kind: str = "bert", seed: int = 0, words=TINY_WORDS, max_position_embeddings: int = 64
) -> str:
    """Save a tiny random text encoder with a WordPiece tokenizer of `words` to `folder`; return the folder.

    kind: "bert" (`tiny_bert`, hidden 16), "clip_text" (CLIPTextModel, pooled output) or "clip" (a full CLIPModel
    whose text embeddings are projected to 12 dimensions). The folder is what `TextTaskEncoder(folder)` takes.
    max_position_embeddings: the encoder's position limit (77 is a real CLIP text encoder's); the tokenizer records
    none, so the model's limit is the only one, as in checkpoints whose tokenizer leaves model_max_length unset.
    """
    from transformers import BertTokenizer, CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    if kind not in ("bert", "clip_text", "clip"):
        raise ValueError(f"kind must be 'bert', 'clip_text' or 'clip', got {kind!r}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(seed)
    sizes = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {**sizes, "vocab_size": len(vocab), "max_position_embeddings": max_position_embeddings}
    clip_text = {**text, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}  # CLIP pools at the [SEP] token
    if kind == "bert":
        model = tiny_bert(len(vocab), seed, max_position_embeddings)
    elif kind == "clip_text":
        model = CLIPTextModel(CLIPTextConfig(**clip_text))
    else:
        vision = {**sizes, "image_size": 32, "patch_size": 16}
        model = CLIPModel(CLIPConfig(text_config=clip_text, vision_config=vision, projection_dim=12))
    model.save_pretrained(folder)
    return str(folder)


def save_tiny_causal_lm(folder: str | Path, words=TINY_WORDS, seed: int = 0, family: str = "llama") -> Path:
    """Save a tiny causal LM of `family` (`tiny_causal_lm`; `tiny_llama` by default) with a word-level tokenizer of
    `words` (split on whitespace; `[EOS]` ends texts, `[PAD]` pads) to `folder`; return the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    specials = ["[PAD]", "[UNK]", "[EOS]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys([*specials, *words]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    model = tiny_causal_lm(
        family,
        seed,
        vocab_size=len(vocab),
        pad_token_id=vocab["[PAD]"],
        eos_token_id=vocab["[EOS]"],
        bos_token_id=None,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_bpe_tokenizer(texts, vocab_size: int = 300):
    """A byte-level BPE `PreTrainedTokenizerFast` (any text encodes) with a few merges trained on `texts`, in
    milliseconds; `<|endoftext|>` is its BOS, EOS and pad token, as in GPT-2-style tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    special = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=special, eos_token=special, pad_token=special)
