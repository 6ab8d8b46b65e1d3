"""The LoRA delta maths of peft's ``merge_and_unload``, computed in float32 block by block.

peft (peers-merge-and-formats.md §1.1, checked against the installed peft 0.21):

* ``scaling = alpha / r`` (``alpha / sqrt(r)`` with rslora), r and alpha per module after
  ``rank_pattern`` / ``alpha_pattern`` (`artifacts.peft_match.effective_r_alpha`);
* Linear: ``delta = transpose(B @ A, fan_in_fan_out) * scaling``; ``lora_B.bias * scaling`` is
  added to the base bias (``lora_bias=True``);
* Embedding: ``delta = (lora_embedding_B @ lora_embedding_A).T * scaling``;
* DoRA: ``W' = m / ||W + delta|| * (W + delta)``, the norm taken per output feature (per row of
  a Linear weight, per column of a transposed one: fan_in_fan_out Linear and Embedding, whose
  stored layout is (in, out));
* ``modules_to_save`` and trained biases replace the base tensor (no maths).

peft adds the delta in the base dtype; we add in float32 and round once to the output dtype,
so our result is the exactly rounded value and peft's is within one rounding of it.

A "transposed" module stores its weight as (in, out) — fan_in_fan_out Linear, Embedding — so
its delta rows are ``A[:, rows].T @ B.T``. Every kind is computed on row blocks except DoRA on a
transposed module, whose norms run down whole columns: that one takes the whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LoraSpec:
    """One adapted module: adapter file keys and the constants of its merge."""

    module: str                          # e.g. "model.layers.0.self_attn.q_proj"
    kind: Literal["linear", "embedding"]
    a: str                               # adapter keys: lora_A / lora_embedding_A
    b: str                               # lora_B / lora_embedding_B
    r: int
    alpha: float
    scaling: float
    fan_in_fan_out: bool = False
    magnitude: str | None = None         # lora_magnitude_vector (DoRA)

    @property
    def transposed(self) -> bool:
        """Whether the base weight is stored (in, out): delta = (B @ A).T."""
        return self.kind == "embedding" or self.fan_in_fan_out

    @property
    def dora(self) -> bool:
        return self.magnitude is not None

    @property
    def whole_tensor(self) -> bool:
        """DoRA on a transposed weight needs column norms over every row at once."""
        return self.dora and self.transposed


@dataclass
class LoraTensors:
    """A module's adapter tensors in float32 on the compute device."""

    A: torch.Tensor
    B: torch.Tensor
    magnitude: torch.Tensor | None = None


def apply_rows(w: torch.Tensor, spec: LoraSpec, t: LoraTensors, start: int, stop: int) -> None:
    """Merge rows ``[start, stop)`` in place: ``w`` is those rows of the base weight, float32.

    For `spec.whole_tensor` the caller passes every row (start=0, stop=rows).
    """
    import torch

    if spec.transposed:
        # delta[start:stop] = ((B @ A).T)[start:stop] = A[:, start:stop].T @ B.T
        w.addmm_(t.A[:, start:stop].t(), t.B.t(), alpha=spec.scaling)
    else:
        w.addmm_(t.B[start:stop], t.A, alpha=spec.scaling)
    if t.magnitude is None:
        return
    if spec.transposed:
        norm = torch.linalg.vector_norm(w, dim=0)
        w.mul_((t.magnitude / norm).unsqueeze(0))
    else:
        norm = torch.linalg.vector_norm(w, dim=1)
        w.mul_((t.magnitude[start:stop] / norm).unsqueeze(1))


def apply_bias(b: torch.Tensor, lora_bias: torch.Tensor, scaling: float) -> None:
    """``b += lora_B.bias * scaling`` in place (float32)."""
    b.add_(lora_bias, alpha=scaling)


def reference_merge(weight: torch.Tensor, spec: LoraSpec, A: torch.Tensor, B: torch.Tensor,
                    magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """peft's formula on the whole tensor, written plainly (float32 result on ``weight``'s device).

    Used to verify a sample of the streamed output; independent of the block code above.
    """
    import torch

    # In place where possible: one float32 copy of the weight at a time (verification runs
    # this on whole tensors, and a 7B down_proj is 180 MB in float32).
    merged = (B.float() @ A.float()).mul_(spec.scaling)
    if spec.transposed:
        merged = merged.T
    merged.add_(weight)
    if magnitude is not None:
        if spec.transposed:
            factor = magnitude.float() / torch.linalg.norm(merged, dim=0)
            merged.mul_(factor.view(1, -1))
        else:
            factor = magnitude.float() / torch.linalg.norm(merged, dim=1)
            merged.mul_(factor.view(-1, 1))
    return merged
