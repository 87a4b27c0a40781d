"""Intruder dimensions (Shuttleworth et al., 2025, "LoRA vs Full Fine-tuning: An Illusion of Equivalence").

Fine-tuning turns a weight ``W`` into ``W' = W + dW``. Take the top ``top_k`` left singular vectors of
``W'`` (by singular value). One of them is an *intruder* when it is far from every left singular vector of
``W``: its largest absolute cosine similarity with them is below ``epsilon``. The paper finds that LoRA
creates such new, high-ranking directions and full fine-tuning mostly does not, and that scaling them down
after training (``W'' = W' + (lam - 1) * sum_i s_i u_i v_i^T`` over the intruders ``i``) recovers part of
what was forgotten; ``lam = 1`` keeps them, ``lam = 0`` removes them. PEFT's ``reduce_intruder_dimension``
does the same on a ``PeftModel``'s LoRA; these functions work on any pair of weights, so on every method
(ftforget's LoRA, any PEFT adapter once merged, full fine-tuning).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Intruders:
    """The intruder analysis of one weight.

    Attributes:
        indices: positions (among the top ``top_k`` singular vectors of ``W'``) of the intruders.
        similarity: for each of the top ``top_k`` singular vectors of ``W'``, its largest absolute cosine
            similarity with the singular vectors of ``W``.
    """

    indices: list[int]
    similarity: list[float]

    @property
    def count(self) -> int:
        return len(self.indices)


def find_intruders(w0: torch.Tensor, w1: torch.Tensor, top_k: int = 10, epsilon: float = 0.5) -> Intruders:
    """The intruder dimensions of ``w1`` (fine-tuned) relative to ``w0`` (pretrained), 2-D, same shape.

    Raises:
        ValueError: shapes differ, a weight is not 2-D, ``top_k < 1`` or ``epsilon`` outside ``(0, 1]``.
    """
    if w0.shape != w1.shape or w0.dim() != 2:
        raise ValueError(
            f"intruders need two 2-D weights of one shape, got {tuple(w0.shape)} and {tuple(w1.shape)}"
        )
    if top_k < 1 or not 0.0 < epsilon <= 1.0:
        raise ValueError(f"intruders: top_k must be >= 1 and 0 < epsilon <= 1, got {top_k}, {epsilon}")
    u0, _, _ = torch.linalg.svd(w0.double(), full_matrices=False)
    u1, _, _ = torch.linalg.svd(w1.double(), full_matrices=False)
    similarity = (u1[:, :top_k].T @ u0).abs().max(dim=1).values
    indices = torch.where(similarity < epsilon)[0].tolist()
    return Intruders(indices=indices, similarity=similarity.tolist())


def reduce_intruders(
    w0: torch.Tensor, w1: torch.Tensor, lam: float, top_k: int = 10, epsilon: float = 0.5
) -> torch.Tensor:
    """``w1`` with each intruder dimension's component ``s_i u_i v_i^T`` scaled by ``lam`` (in ``w1``'s dtype).

    ``lam = 1`` returns ``w1`` unchanged (the same values); ``lam = 0`` removes the intruders.
    """
    found = find_intruders(w0, w1, top_k, epsilon)
    if not found.indices or lam == 1:
        return w1.clone()
    u, s, vh = torch.linalg.svd(w1.double(), full_matrices=False)
    i = torch.tensor(found.indices)
    part = (u[:, i] * s[i]) @ vh[i]
    return (w1.double() + (lam - 1.0) * part).to(w1.dtype)
