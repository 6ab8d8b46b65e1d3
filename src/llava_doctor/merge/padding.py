"""The mean row of a 2-d tensor, streamed: what the llava-hf conversion gives new vocab rows.

transformers' conversion scripts sample the new ``<image>``/``<pad>`` rows (and the rows up to
a multiple of 64) around the mean of the existing ones; we set them to that mean exactly, so a
conversion is deterministic and verifiable. The sum is taken in float64 block by block, so the
result does not depend on the block size beyond float64 rounding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llava_doctor.merge.sources import TensorSource

if TYPE_CHECKING:
    import torch


def mean_row(src: TensorSource, key: str, block_rows: int) -> torch.Tensor:
    """Mean over dim 0 of tensor ``key`` of ``src``, in float64, reading ``block_rows`` at once."""
    import torch

    info = src.wf.tensors[key]
    rows = info.shape[0]
    acc = torch.zeros(info.shape[1:], dtype=torch.float64)
    for start in range(0, rows, max(1, block_rows)):
        acc += src.rows(key, start, min(rows, start + block_rows)).double().sum(dim=0)
    return acc / max(1, rows)
