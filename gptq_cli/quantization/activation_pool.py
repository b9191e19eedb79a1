"""Activations kept between calibration passes, in buffers reused from group to group and block to
block.

What a block's passes keep (its inputs, a tail's recorded inputs and then its outputs, a submodule's
arguments for the next group's replay) is copied into buffers of this pool and handed back as soon
as its last reader is done. On the CPU each buffer is an anonymous mapping of its own, outside the C
heap: the heap then holds only a pass's temporaries, whose size does not depend on depth, and does
not fragment around long-lived tensors (which made peak RSS creep block after block, issue 29). A
buffer handed back is lent again to the next tensor of its shape, so its pages are faulted in once
per run, not once per block. Copies keep values and shape exactly; a tensor that is not contiguous
is kept as it is (a copy would change its strides, and with them the kernels that later read it,
hence the bytes).
"""

from __future__ import annotations

import math
import mmap

import torch
from torch import Tensor

__all__ = ["BufferPool"]


class BufferPool:
    """keep(t) lends a buffer holding a copy of t; give(buffer) takes it back. Free buffers of other
    shapes are released whenever one is lent, so what the pool holds beyond what is lent is buffers
    of the shape asked for
    last: the next requests of that shape reuse them (a block's inputs, recorded and replayed in
    turn), and a shape not asked for again soon (a tail's wide inputs once its outputs are made)
    is not held until the next block. Holding those cost SmolLM2 fp32 0.4 GB of peak, refaulting
    them costs about 40 ms per block."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[Tensor]] = {}
        self._lent: dict[int, Tensor] = {}

    def keep(self, t: Tensor) -> Tensor:
        if not t.is_contiguous() or t.numel() == 0:
            return t
        key = (tuple(t.shape), t.dtype, t.device)
        free = self._free.get(key)
        self._free = {key: free} if free else {}  # other shapes' free buffers: their pages go back
        buffer = free.pop() if free else _allocate(key)
        self._lent[id(buffer)] = buffer
        return buffer.copy_(t)

    def give(self, t: Tensor) -> None:
        """Take back a buffer keep() lent (anything else is left alone); its contents are
        overwritten later."""
        buffer = self._lent.pop(id(t), None)
        if buffer is not None:
            self._free.setdefault((tuple(buffer.shape), buffer.dtype, buffer.device), []).append(
                buffer
            )

    def host_bytes(self) -> int:
        """Bytes of the pool's buffers in host memory, lent or free."""
        buffers = list(self._lent.values()) + [b for free in self._free.values() for b in free]
        return sum(b.numel() * b.element_size() for b in buffers if b.device.type == "cpu")


def _allocate(key: tuple) -> Tensor:
    shape, dtype, device = key
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    # an anonymous mapping, unmapped when the tensor (which holds it) is freed
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype, count=numel).view(shape)
