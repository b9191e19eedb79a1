"""activation_pool.BufferPool: kept tensors are exact copies in buffers of their own, lent again
after they are given back, and what the pool holds follows what is lent."""

from __future__ import annotations

import torch

from gptq_cli.quantization.activation_pool import BufferPool


def test_keep_copies_exactly_and_reuses_a_given_back_buffer() -> None:
    pool = BufferPool()
    x = torch.randn(2, 3, 5, dtype=torch.bfloat16)
    kept = pool.keep(x)
    assert kept is not x and torch.equal(kept, x) and kept.dtype == x.dtype and kept.is_contiguous()
    x.zero_()
    assert not torch.equal(kept, x)  # a copy, not a view
    pool.give(kept)
    y = torch.randn(2, 3, 5, dtype=torch.bfloat16)
    again = pool.keep(y)
    # the same buffer, new contents
    assert again.data_ptr() == kept.data_ptr() and torch.equal(again, y)


def test_other_shapes_free_buffers_are_released_when_one_is_lent_and_strangers_left_alone() -> None:
    pool = BufferPool()
    a = pool.keep(torch.ones(4, 8))
    pool.give(a)
    # another shape: a's free buffer is released, not kept
    b = pool.keep(torch.ones(4, 16))
    assert pool._free == {}
    pool.give(torch.ones(4, 16))  # not one of the pool's buffers: ignored
    assert pool._free == {}
    pool.give(b)
    assert len(pool._free[((4, 16), torch.float32, torch.device("cpu"))]) == 1
    # lending another shape releases b's free buffer at once
    c = pool.keep(torch.ones(4, 8))
    assert not any(pool._free.values()) and torch.equal(c, torch.ones(4, 8))


def test_a_tensor_that_is_not_contiguous_is_kept_as_it_is() -> None:
    pool = BufferPool()
    t = torch.randn(6, 4).t()
    # a contiguous copy would change the strides later kernels see
    assert pool.keep(t) is t
