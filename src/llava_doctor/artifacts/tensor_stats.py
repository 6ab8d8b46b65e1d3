"""What the value checks need to know about a tensor (NaN/Inf, fp16 overflow, all-zero).

`TensorStats` is what `Context.all_stats` returns; `check` computes it with numpy while
streaming the file (`artifacts/values.py`). `tensor_stats` computes it from a torch tensor: the
fallback for dtypes numpy has no type for (float8, ...) and the reference the tests hold the
numpy path to.

Finite tensors take one vectorised `aminmax` pass. Tensors holding NaN/Inf are viewed as
integers: with the sign bit cleared, IEEE bit patterns order like magnitudes, so the NaN/Inf
count and the largest finite magnitude come from integer ops without a float32 copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FP16_MAX = 65504.0


@dataclass(frozen=True)
class TensorStats:
    numel: int
    nonfinite: int        # NaN or +-Inf elements
    max_abs: float        # largest finite magnitude (0.0 for an empty tensor)
    all_zero: bool        # every element is +-0

    @property
    def overflows_fp16(self) -> bool:
        return self.max_abs > FP16_MAX


def tensor_stats(t: torch.Tensor) -> TensorStats:
    """Statistics of a float tensor (other dtypes: finite by definition)."""
    import torch

    n = t.numel()
    if n == 0:
        return TensorStats(0, 0, 0.0, True)
    layout = {torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
              torch.float16: (torch.int16, 0x7FFF, 0x7C00),
              torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000)}.get(t.dtype)
    if layout is None:
        if t.dtype.is_floating_point or t.dtype.is_complex:
            f = t.double() if not t.dtype.is_complex else t.abs().double()
            fin = torch.isfinite(f)
            mx = float(f[fin].abs().max()) if bool(fin.any()) else 0.0
            return TensorStats(n, int((~fin).sum()), mx, bool((f == 0).all()))
        return TensorStats(n, 0, float(t.abs().max()), bool((t == 0).all()))
    # Fast path, one vectorised pass: aminmax propagates NaN and Inf, so finite extremes mean a
    # finite tensor. Only tensors holding NaN/Inf take the bit-level path below.
    lo, hi = torch.aminmax(t.reshape(-1))
    flo, fhi = float(lo), float(hi)
    if abs(flo) != float("inf") and abs(fhi) != float("inf") and flo == flo and fhi == fhi:
        return TensorStats(n, 0, max(abs(flo), abs(fhi)), flo == 0.0 and fhi == 0.0)
    itype, mask, exp_all_ones = layout
    bits = t.contiguous().view(itype).reshape(-1) & mask
    nonfinite_mask = bits >= exp_all_ones
    nonfinite = int(nonfinite_mask.sum())
    if nonfinite:
        bits = bits.masked_fill(nonfinite_mask, 0)
    top = bits.max()
    max_abs = float(top.view(t.dtype))
    return TensorStats(n, nonfinite, abs(max_abs), bool(int(top) == 0 and not nonfinite))
