"""How close a condition is to each training task's condition: the one similarity the task memory mixes by and
`generate_adapter` reports neighbours and "not close to any training task" warnings by.

Cosine similarity, raw or centred. Centred (`PeftCVAEConfig.memory_centered`) subtracts the training tasks' mean
condition from both sides first. In-context task vectors (Eq. 1, a base model's hidden states) share one large
direction, so their raw cosines all sit near 1 (on the BIG-bench full preset the 1st and 5th nearest bank task of a
held-out task differ by 0.03) and a softmax over them spreads over dozens of tasks; centred, they spread out.
"""

import torch
import torch.nn.functional as F

__all__ = ["condition_similarity"]


def condition_similarity(
    conditions: torch.Tensor, task_conditions: torch.Tensor, centered: bool = False
) -> torch.Tensor:
    """Cosine similarities (B, T) of conditions (B, cond) to the training tasks' conditions (T, cond); `centered`:
    both taken relative to the mean of `task_conditions`."""
    if centered:
        center = task_conditions.mean(dim=0)  # (cond,)
        conditions, task_conditions = conditions - center, task_conditions - center
    return F.cosine_similarity(conditions[:, None, :], task_conditions[None], dim=-1)  # (B, T)
