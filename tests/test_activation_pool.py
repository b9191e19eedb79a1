"""activation_pool.BufferPool: kept tensors are exact copies in buffers of their own, lent again after they are
given back, and what the pool holds follows what is lent."""
from __future__ import annotations

import torch

from gptq_cli.activation_pool import BufferPool


def test_keep_copies_exactly_and_reuses_a_given_back_buffer() -> None:
    pool = BufferPool()
    x = torch.randn(2, 3, 5, dtype=torch.bfloat16)
    kept = pool.keep(x)
    assert kept is not x and torch.equal(kept, x) and kept.dtype == x.dtype and kept.is_contiguous()
    x.zero_()
    assert not torch.equal(kept, x)                 # a copy, not a view
    pool.give(kept)
    y = torch.randn(2, 3, 5, dtype=torch.bfloat16)
    again = pool.keep(y)
    assert again.data_ptr() == kept.data_ptr() and torch.equal(again, y)   # the same buffer, new contents


def test_other_shapes_free_buffers_are_released_when_one_is_lent_and_strangers_left_alone() -> None:
    pool = BufferPool()
    a = pool.keep(torch.ones(4, 8))
    pool.give(a)
    b = pool.keep(torch.ones(4, 16))                # another shape: a's free buffer is released, not kept
    assert pool._free == {}
    pool.give(torch.ones(4, 16))                    # not one of the pool's buffers: ignored
    assert pool._free == {}
    pool.give(b)
    assert len(pool._free[((4, 16), torch.float32, torch.device("cpu"))]) == 1
    c = pool.keep(torch.ones(4, 8))                 # lending another shape releases b's free buffer at once
    assert not any(pool._free.values()) and torch.equal(c, torch.ones(4, 8))


def test_a_tensor_that_is_not_contiguous_is_kept_as_it_is() -> None:
    pool = BufferPool()
    t = torch.randn(6, 4).t()
    assert pool.keep(t) is t                        # a contiguous copy would change the strides later kernels see
