"""The factorised generator network (`architecture="factorised"`): tokens per row block, embeddings per layer and
module type, one head shared by every layer.

Why
---
The conv network (`modeling_peft_cvae.py`) gives every 256-number patch its own free position embedding and runs
1-D convolutions along all patches, so its size and activation memory grow with N, the numbers per checkpoint
(43M parameters and ~111 GB of activations at batch 16 for Llama-3-8B r=16 on all linear layers, see
docs/benchmarks_scaling.md). Text-to-LoRA's hypernetwork shows the way out: what a position means is (which layer,
which module, A or B, which rows), and those factors are shared across the model.

Tokens
------
Every LoRA tensor is read as a list of rows of r numbers: the input features of lora_A (A is (r, in), read as A^T,
(in, r)) and the output features of lora_B ((out, r)). `block_rows` consecutive rows make one token of
P = block_rows * r numbers (the last block of a tensor zero-padded), so no token mixes two tensors and the k-th number
of every token means the same (row k // r of the block, rank component k % r) in every layer and module. Tensors of
other shapes (a `lora_B.bias`, conv LoRAs, another rank in `rank_pattern`) are cut into P-number blocks of their
flattened values the same way.

A token's embedding is the sum of four small tables: layer index (the integers in the module path, e.g.
`layers.12`; for a diffusers UNet the tuple of them), module type (`q_proj`, `to_k`, ...), kind (A, B, other) and
block index within its tensor. Their sizes grow with the number of layers and the widest tensor, never with N.

Network
-------
Encoder q(z | x, c): Linear(P -> H) of each token + its embedding + the projected condition, `num_layers` residual
MLP blocks per token modulated by the condition (adaptive LayerNorm scale and shift, as in DiT), LayerNorm, mean over
all tokens, Linear(H -> 2 Z).

Decoder p(x | z, c): context = proj(z) + proj(c) (B, H); every token starts as its embedding + context, runs through
`num_layers` residual MLP blocks modulated by the context, and ONE head, LayerNorm -> Linear(H -> P) shared by all
tokens, writes its P numbers (zero-initialised, so an untrained generator writes the bank mean).

Tokens do not look at each other: cost is linear in the number of tokens with a small constant, and the parameter
count is H^2 * num_layers + H * (P + tables), independent of N.
"""

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FactorisedDecoder", "FactorisedEncoder", "TokenLayout", "TrunkBlock"]

KIND_A, KIND_B, KIND_OTHER = 0, 1, 2
_LAYER_NUMBER = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def _tensor_kind(key: str, shape: list[int]) -> int:
    """A (read transposed), B, or another tensor (read flat)."""
    if key.endswith(".bias") or len(shape) < 2:
        return KIND_OTHER
    if ".lora_A." in key or "lora_embedding_A" in key:
        return KIND_A
    if ".lora_B." in key or "lora_embedding_B" in key:
        return KIND_B
    return KIND_OTHER


def _module_path(key: str) -> str:
    """`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` -> `...layers.3.self_attn.q_proj`."""
    return re.split(r"\.lora_(?:embedding_)?[AB]\b|\.lora_magnitude", key)[0]


@dataclass(frozen=True)
class _Tensor:
    start: int  # offset in the flat vector
    size: int  # numbers
    shape: tuple[int, ...]
    kind: int
    num_blocks: int
    layer: int
    module: int


class TokenLayout:
    """The map between a `LoraLayout`'s flat vector (B, N) and row-block tokens (B, L, P), and each token's
    (layer, module, kind, block) indices. Derived from the layout alone, so nothing of it is stored."""

    def __init__(self, layout, block_rows: int):
        rank = int(layout.lora_config.get("r") or 1)
        self.block_size = block_rows * rank  # P
        paths = [_module_path(key) for key in layout.keys]
        layer_names = {}
        module_names = sorted({path.rsplit(".", 1)[-1] for path in paths})
        tensors, start = [], 0
        for key, shape, size, path in zip(layout.keys, layout.shapes, layout.sizes, paths):
            layer = layer_names.setdefault(tuple(_LAYER_NUMBER.findall(path)), len(layer_names))
            tensors.append(
                _Tensor(
                    start=start,
                    size=size,
                    shape=tuple(shape),
                    kind=_tensor_kind(key, shape),
                    num_blocks=-(-size // self.block_size),
                    layer=layer,
                    module=module_names.index(path.rsplit(".", 1)[-1]),
                )
            )
            start += size
        self.tensors = tensors
        self.num_layer_ids = len(layer_names)
        self.num_module_types = len(module_names)
        self.max_blocks = max(tensor.num_blocks for tensor in tensors)
        self.num_tokens = sum(tensor.num_blocks for tensor in tensors)

    def token_ids(self, device=None) -> dict[str, torch.Tensor]:
        """Index of each token into the four embedding tables, each (L,) int64."""
        ids = {"layer": [], "module": [], "kind": [], "block": []}
        for tensor in self.tensors:
            ids["layer"].append(torch.full((tensor.num_blocks,), tensor.layer))
            ids["module"].append(torch.full((tensor.num_blocks,), tensor.module))
            ids["kind"].append(torch.full((tensor.num_blocks,), tensor.kind))
            ids["block"].append(torch.arange(tensor.num_blocks))
        return {name: torch.cat(parts).to(device) for name, parts in ids.items()}

    def tokenize(self, flat: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B, L, P): lora_A read as A^T, each tensor's rows in blocks, the last block zero-padded."""
        batch, pieces = flat.shape[0], []
        for tensor in self.tensors:
            piece = flat[:, tensor.start : tensor.start + tensor.size]
            if tensor.kind == KIND_A:  # (B, r, in, ...) -> (B, in, ..., r): rows of r numbers
                piece = piece.reshape(batch, *tensor.shape).movedim(1, -1).reshape(batch, -1)
            padding = tensor.num_blocks * self.block_size - tensor.size
            pieces.append(F.pad(piece, (0, padding)).view(batch, tensor.num_blocks, self.block_size))
        return torch.cat(pieces, dim=1)

    def untokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, P) -> (B, N), the inverse of `tokenize` (padding dropped)."""
        batch, pieces = tokens.shape[0], []
        # one split, not a slice per tensor: each slice's backward would write a zero tensor as large as all tokens
        blocks = tokens.split([tensor.num_blocks for tensor in self.tensors], dim=1)
        for tensor, block in zip(self.tensors, blocks):
            piece = block.reshape(batch, -1)[:, : tensor.size]
            if tensor.kind == KIND_A:
                oriented = (*tensor.shape[1:], tensor.shape[0])  # (in, ..., r)
                piece = piece.reshape(batch, *oriented).movedim(-1, 1).reshape(batch, -1)
            pieces.append(piece)
        return torch.cat(pieces, dim=1)


class TokenEmbedding(nn.Module):
    """Sum of the layer, module-type, kind and block-index embeddings of every token: (L, H). The token indices are
    derived from the layout and cached per device (not buffers: nothing of them is saved)."""

    def __init__(self, tokens: TokenLayout, channels: int):
        super().__init__()
        self._tokens = tokens
        self._ids = {}
        self.layer = nn.Embedding(tokens.num_layer_ids, channels)
        self.module = nn.Embedding(tokens.num_module_types, channels)
        self.kind = nn.Embedding(3, channels)
        self.block = nn.Embedding(tokens.max_blocks, channels)

    def forward(self) -> torch.Tensor:
        device = self.layer.weight.device
        if device not in self._ids:
            self._ids[device] = self._tokens.token_ids(device)
        ids = self._ids[device]
        layer_and_module = self.layer(ids["layer"]) + self.module(ids["module"])
        return layer_and_module + self.kind(ids["kind"]) + self.block(ids["block"])


class TrunkBlock(nn.Module):
    """Residual MLP on every token, its LayerNorm scaled and shifted by a per-sample context (adaptive LayerNorm):
    x + W2 SiLU(W1 (LN(x) * (1 + scale(ctx)) + shift(ctx)))."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels, elementwise_affine=False)
        self.modulation = nn.Linear(channels, 2 * channels)
        self.fc1 = nn.Linear(channels, channels)
        self.fc2 = nn.Linear(channels, channels)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # (B, L, H), (B, H)
        scale, shift = self.modulation(context)[:, None].chunk(2, dim=-1)  # (B, 1, H) each
        return hidden + self.fc2(F.silu(self.fc1(self.norm(hidden) * (1 + scale) + shift)))


class FactorisedEncoder(nn.Module):
    """q(z | x, c): tokens (B, L, P) and condition (B, cond) -> mean and log-variance of z, each (B, Z)."""

    def __init__(self, config, tokens: TokenLayout):
        from .modeling_peft_cvae import ConditionProjection

        super().__init__()
        channels = config.hidden_channels
        self.token_projection = nn.Linear(tokens.block_size, channels)
        self.embedding = TokenEmbedding(tokens, channels)
        self.condition_projection = ConditionProjection(config.condition_size, channels)
        self.blocks = nn.ModuleList(TrunkBlock(channels) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(channels)
        self.to_latent = nn.Linear(channels, 2 * config.latent_size)

    def forward(self, tokens: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context = self.condition_projection(condition)  # (B, H)
        hidden = self.token_projection(tokens) + self.embedding() + context[:, None]  # (B, L, H)
        for block in self.blocks:
            hidden = block(hidden, context)
        pooled = F.silu(self.norm(hidden)).mean(dim=1)  # (B, H)
        mean, log_variance = self.to_latent(pooled).chunk(2, dim=-1)  # (B, Z) each
        return mean, log_variance


class FactorisedDecoder(nn.Module):
    """p(x | z, c): latent (B, Z) and condition (B, cond) -> tokens (B, L, P) in normalised space."""

    def __init__(self, config, tokens: TokenLayout):
        from .modeling_peft_cvae import ConditionProjection, MemorySimilarityProjection

        super().__init__()
        channels = config.hidden_channels
        self.memory_projection = MemorySimilarityProjection(channels) if config.memory_holdout > 0 else None
        self.latent_projection = nn.Linear(config.latent_size, channels)
        self.condition_projection = ConditionProjection(config.condition_size, channels)
        self.embedding = TokenEmbedding(tokens, channels)
        self.blocks = nn.ModuleList(TrunkBlock(channels) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(channels)
        self.head = nn.Linear(channels, tokens.block_size)  # one head for every layer, module and block
        self.head.is_output_layer = True  # zero-initialised, see PeftCVAEGenerator._init_weights

    def forward(
        self, latent: torch.Tensor, condition: torch.Tensor, memory_similarity: torch.Tensor | None = None
    ) -> torch.Tensor:
        context = self.latent_projection(latent) + self.condition_projection(condition)  # (B, H)
        if self.memory_projection is not None:  # config.memory_holdout > 0: is the task in the memory?
            context = context + self.memory_projection(memory_similarity)
        hidden = self.embedding()[None] + context[:, None]  # (B, L, H)
        for block in self.blocks:
            hidden = block(hidden, context)
        return self.head(self.norm(hidden))  # (B, L, P)
