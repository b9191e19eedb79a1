"""Several processes on one quantization run (`torchrun --nproc-per-node N gptq quantize ...`).

Every rank streams the same blocks and holds its own share of the calibration batches. After each
sequential group's calibration pass the ranks' Hessians are gathered and combined in rank order (a
fixed order, so the same run twice gives the same bytes), the group's solves are spread over the
ranks by cost, and each result is broadcast from the rank that solved it, so every rank puts the
same quantized weights in place. Rank 0 alone writes the work dir and the checkpoint. NCCL on GPUs,
gloo on CPUs; every collective has a timeout, so a rank that dies makes the others fail with one
line instead of hanging.

N ranks do not give 1 rank's bytes: one process folds its batches into a running mean one after
another, N processes combine N partial means, which rounds differently in float32. That moves
act-order's near-tied columns and rounding ties; the per-module losses stay within a few per mille
(tests/test_distributed.py).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch

from gptq_cli.errors import GptqError, UsageError
from gptq_cli.format.quantized import QuantizedWeight

TIMEOUT = timedelta(seconds=45)  # a rank waits at most this long for the others in any collective
T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank `rank` of `world` (a single process is rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"  # where collectives' tensors live (NCCL needs this rank's GPU)

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def share(self, items: list[T]) -> list[T]:
        """This rank's share of `items` (every world-th one, starting at its rank)."""
        if len(items) < self.world:
            raise UsageError(
                f"{self.world} processes need at least {self.world} calibration batches, got "
                f"{len(items)}; lower --batch-size or raise --nsamples"
            )
        return items[self.rank :: self.world]


def init(device: torch.device) -> Ranks:
    """Join the process group torchrun set up (RANK/WORLD_SIZE in the environment); a plain run
    is 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        _collective(
            Ranks(int(os.environ.get("RANK", "0")), world),
            "joining them",
            lambda: dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT
            ),
        )
    where = f"cuda:{torch.cuda.current_device()}" if device.type == "cuda" else "cpu"
    return Ranks(dist.get_rank(), dist.get_world_size(), where)


def _collective(ranks: Ranks, what: str, fn: Callable[[], T]) -> T:
    """Run a collective; a lost or silent peer becomes one clear error instead of a traceback or
    a hang."""
    try:
        return fn()
    # gloo/NCCL/the store report a dead peer or a timeout so
    except (RuntimeError, ValueError) as e:
        # gloo prefixes its messages with "[source.cc:line]": dropped (noise, and markup to the
        # console)
        reason = re.sub(
            r"\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0] if str(e).strip() else ""
        )[:120]
        reason = reason.split(". ")[0] or type(e).__name__
        raise GptqError(
            f"rank {ranks.rank} of {ranks.world} lost the other processes while {what} ({reason}); "
            f"finished blocks are kept: rerun the same command to continue"
        ) from e


def reduce_hessians(
    ranks: Ranks,
    hessians: list[tuple[list[str], torch.Tensor, int]],
    crosses: dict[str, torch.Tensor] | None = None,
) -> list[tuple[list[str], torch.Tensor, int]]:
    """Every rank's (names, H, n) combined into the Hessian of all ranks' tokens, H = Σ_r (n_r /
    n) H_r in rank order; the same list on every rank. `crosses` (GPTAQ's ΔX X̃ᵀ by the name of a
    linear of its Hessian, running means like H) are combined the same way, in place."""
    if ranks.world == 1:
        return hessians
    import torch.distributed as dist

    def gathered(T: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(T) for _ in range(ranks.world)]
        _collective(ranks, "sharing Hessians", lambda: dist.all_gather(parts, T.contiguous()))
        return parts

    out = []
    for names, H, n in hessians:
        counts = gathered(torch.tensor([float(n)], dtype=torch.float64, device=H.device))
        counts = [int(c) for c in counts]
        H, total = combine_means(gathered(H), counts)
        for owner in [o for o in crosses or {} if o in names]:
            crosses[owner] = combine_means(gathered(crosses[owner]), counts)[0]
        out.append((names, H, total))
    return out


def combine_means(parts: list[torch.Tensor], counts: list[int]) -> tuple[torch.Tensor, int]:
    """Σ_r (n_r / n) H_r in list order: the mean over all tokens from the ranks' means (and the
    token count). Equal to one process's running mean up to float32 rounding
    (tests/test_distributed.py bounds it)."""
    total = sum(counts)
    H = torch.zeros_like(parts[0])
    for c, part in zip(counts, parts):
        H.add_(part, alpha=c / total)
    return H, total


def owners(ranks: Ranks, shapes: list[tuple[int, int]]) -> list[int]:
    """Which rank solves each (rows N, columns K) problem: largest first (cost ~ N·K² + K³) to
    the least loaded rank, ties to the lowest rank, so every rank computes the same assignment."""
    cost = [n * k**2 + k**3 for n, k in shapes]
    load = [0] * ranks.world
    owner = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: -cost[i]):
        r = min(range(ranks.world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += cost[i]
    return owner


def broadcast_result(
    ranks: Ranks,
    qw: QuantizedWeight | None,
    seconds: float,
    owner: int,
    shape: tuple[int, int],
    bits: int,
    group_size: int,
    device: torch.device,
) -> tuple[QuantizedWeight, float]:
    """The owner's solve result (and its time) on every rank; `qw` is None on the others."""
    if ranks.world == 1:
        return qw, seconds
    import torch.distributed as dist

    N, K = shape
    G = 1 if group_size == -1 else math.ceil(K / group_size)
    if qw is None:
        qw = QuantizedWeight(
            codes=torch.empty(N, K, dtype=torch.int32, device=device),
            scales=torch.empty(G, N, dtype=torch.float16, device=device),
            zeros=torch.empty(G, N, dtype=torch.int32, device=device),
            g_idx=torch.empty(K, dtype=torch.int32, device=device),
            bits=bits,
            group_size=group_size,
            row_loss=torch.empty(N, dtype=torch.float32, device=device),
        )
    scalars = torch.tensor([qw.loss, qw.damp, seconds], dtype=torch.float64, device=device)
    for t in (qw.codes, qw.scales, qw.zeros, qw.g_idx, qw.row_loss, scalars):
        _collective(ranks, "sharing solved layers", lambda t=t: dist.broadcast(t, src=owner))
    qw.loss, qw.damp = float(scalars[0]), float(scalars[1])
    return qw, float(scalars[2])


def broadcast_ints(ranks: Ranks, values: list[int]) -> list[int]:
    """Rank 0's `values` on every rank (the same count on each)."""
    if ranks.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.int64, device=ranks.device)
    _collective(ranks, "starting", lambda: dist.broadcast(t, src=0))
    return t.tolist()
