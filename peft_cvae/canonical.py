"""A canonical form for LoRA checkpoints (`PeftCVAEConfig.canonical_form="svd"`).

A LoRA acts through `B @ A` only: `(B M, M^-1 A)` is the same adapter for any invertible r x r matrix M, so two
checkpoints that compute the same update can hold very different numbers, and a generator trained on raw factors
spends capacity on that arbitrary gauge. The canonical form picks one representative of each update:

    B @ A = U S V^T (its rank-r SVD),   B' = U sqrt(S),   A' = sqrt(S) V^T,

with the sign of each singular pair fixed so that the largest-magnitude entry of each column of U is positive. B' and
A' have the shapes of B and A, so the result is an ordinary rank-r PEFT adapter (same keys, same LoraConfig) and
`B' @ A' == B @ A` up to rounding. The SVD is taken without forming the (out, in) product: with A^T = Q_a R_a and
B = Q_b R_b (thin QR), B @ A = Q_b (R_b R_a^T) Q_a^T, and only the r x r core is decomposed, O((in + out) r^2).

Only pairs of 2-D `lora_A.weight` (r, in) and `lora_B.weight` (out, r) are re-factorised; every other tensor (biases,
conv or embedding LoRAs) passes unchanged.
"""

from collections import defaultdict

import torch

__all__ = ["canonicalize", "lora_pairs"]


def lora_pairs(layout) -> list[tuple[int, int, int, int, int]]:
    """`(a_start, b_start, rank, in_features, out_features)` of every (lora_A, lora_B) weight pair of 2-D tensors with
    a common rank, in the flat vector of `layout`."""
    starts, start = {}, 0
    for key, size in zip(layout.keys, layout.sizes):
        starts[key] = start
        start += size
    shapes = dict(zip(layout.keys, layout.shapes))
    pairs = []
    for key, shape in shapes.items():
        if not key.endswith(".lora_A.weight") or len(shape) != 2:
            continue
        partner = key[: -len(".lora_A.weight")] + ".lora_B.weight"
        other = shapes.get(partner)
        if other is None or len(other) != 2 or other[1] != shape[0]:
            continue
        pairs.append((starts[key], starts[partner], shape[0], shape[1], other[0]))
    return pairs


@torch.no_grad()
def canonicalize(flat: torch.Tensor, layout) -> torch.Tensor:
    """Raw flat LoRA vectors (B, N) -> the same adapters in canonical form (B, N), computed in float64.

    Pairs of equal shape are decomposed together in one batched QR and SVD.
    """
    batch = flat.shape[0]
    result = flat.clone()
    groups = defaultdict(list)
    for a_start, b_start, rank, fan_in, fan_out in lora_pairs(layout):
        groups[rank, fan_in, fan_out].append((a_start, b_start))
    for (rank, fan_in, fan_out), starts in groups.items():
        a_size, b_size = rank * fan_in, fan_out * rank
        lora_a = torch.stack([flat[:, a : a + a_size] for a, _ in starts], dim=1).double()  # (B, G, r*in)
        lora_b = torch.stack([flat[:, b : b + b_size] for _, b in starts], dim=1).double()  # (B, G, out*r)
        lora_a = lora_a.view(batch, len(starts), rank, fan_in)
        lora_b = lora_b.view(batch, len(starts), fan_out, rank)
        q_a, r_a = torch.linalg.qr(lora_a.transpose(-1, -2))  # (B, G, in, r), (B, G, r, r)
        q_b, r_b = torch.linalg.qr(lora_b)  # (B, G, out, r), (B, G, r, r)
        u, s, vh = torch.linalg.svd(r_b @ r_a.transpose(-1, -2))  # core (B, G, r, r)
        left = q_b @ u  # (B, G, out, r), orthonormal columns
        right = q_a @ vh.transpose(-1, -2)  # (B, G, in, r)
        largest = left.abs().argmax(dim=-2, keepdim=True)  # (B, G, 1, r)
        sign = torch.sign(left.gather(-2, largest))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        root = s.sqrt()[..., None, :]  # (B, G, 1, r)
        new_b = left * sign * root  # (B, G, out, r)
        new_a = (right * sign * root).transpose(-1, -2)  # (B, G, r, in)
        for index, (a, b) in enumerate(starts):
            result[:, a : a + a_size] = new_a[:, index].reshape(batch, -1).to(result.dtype)
            result[:, b : b + b_size] = new_b[:, index].reshape(batch, -1).to(result.dtype)
    return result
