"""`--target-bits`: choose one (bits, group size) per quantized linear so that the checkpoint's
quantized linears average at most B bits per weight and the summed loss is smallest (a
multiple-choice knapsack). Pure: numbers in, choices out; what the losses are is measure.py's
business.

Size is counted as the file stores it (SPEC §2), for K inputs, N outputs, b bits, group g, G =
ceil(K / g): qweight packed_len(K, b)·N words (3 bits: 3 words per 32 values, padded), qzeros
G·packed_len(N, b) words, scales G·N fp16, g_idx K int32. Biases are stored whatever the setting and
are not counted.

The knapsack is solved exactly by dynamic programming over sizes counted in units of `unit` bits,
each candidate's size rounded up to whole units, so the budget always holds. The units are exact
when every size is a multiple of them (small problems use the sizes' gcd); otherwise the choice is
optimal for the rounded sizes, which is at least as good as the true optimum for a budget smaller by
(modules x unit) bits -- at most RESOLUTION-th of the budget per module (about 0.2% of the budget
for a 30-layer model's 210 linears). Ties are broken towards the earlier candidate of the list, so
the result is deterministic.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import reduce

import numpy as np

from gptq_cli.errors import UsageError
from gptq_cli.format.bitpack import packed_len
from gptq_cli.format.config import BITS, check_setting

DEFAULT_BITS = BITS  # every width the format supports
DEFAULT_GROUPS = (32, 64, 128)
RESOLUTION = 1 << 17  # DP cells over the budget when the sizes' gcd would need more


@dataclass(frozen=True, order=True)
class Candidate:
    bits: int
    group_size: int  # -1: one group per column

    @property
    def name(self) -> str:
        return f"{self.bits}g{self.group_size}" if self.group_size != -1 else f"{self.bits}gpc"


def stored_bits(in_features: int, out_features: int, c: Candidate) -> int:
    """Bits that one quantized linear takes in the checkpoint (qweight + qzeros + scales +
    g_idx)."""
    k, n = in_features, out_features
    groups = math.ceil(k / (k if c.group_size == -1 else c.group_size))
    return (
        32 * (packed_len(k, c.bits) * n + groups * packed_len(n, c.bits)) + 16 * groups * n + 32 * k
    )


def average_bits(shapes: list[tuple[int, int]], choices: list[Candidate]) -> float:
    """Stored bits per quantized weight of linears with (in, out) `shapes` under `choices`."""
    total = sum(stored_bits(k, n, c) for (k, n), c in zip(shapes, choices))
    return total / sum(k * n for k, n in shapes)


def parse_candidates(text: str | None) -> list[Candidate]:
    """--candidates: a comma list of settings like "4g128,3g64,8g-1" (g-1: per channel), or
    "bits=3,4 group=64,128" for their cross product. None: bits 2/3/4/8 x groups 32/64/128."""
    if text is None:
        return [Candidate(b, g) for b in DEFAULT_BITS for g in DEFAULT_GROUPS]
    text = text.strip()
    try:
        if "=" in text:
            parts = dict(p.split("=", 1) for p in text.split())
            if set(parts) != {"bits", "group"}:
                raise ValueError
            found = [
                Candidate(int(b), int(g))
                for b in parts["bits"].split(",")
                for g in parts["group"].split(",")
            ]
        else:
            found = []
            for part in text.split(","):
                m = re.fullmatch(r"(\d+)g(-1|\d+)", part.strip())
                if m is None:
                    raise ValueError
                found.append(Candidate(int(m[1]), int(m[2])))
    except ValueError:
        raise UsageError(
            f'--candidates {text!r}: write settings as "4g128,3g64" (bits g group size, g-1 for '
            f'per channel) or as "bits=3,4 group=64,128"'
        ) from None
    for c in found:
        try:
            check_setting(c.bits, c.group_size)
        except ValueError:
            raise UsageError(
                f"--candidates: {c.name} is not a GPTQ setting (bits "
                f"{', '.join(map(str, BITS[:-1]))} or {BITS[-1]}; group size >= 1 or -1)"
            ) from None
    return sorted(set(found))


def budget_range(shapes: list[tuple[int, int]], candidates: list[Candidate]) -> tuple[float, float]:
    """The smallest and largest achievable average bits: every module at its smallest / largest
    candidate."""
    sizes = [[stored_bits(k, n, c) for c in candidates] for k, n in shapes]
    weights = sum(k * n for k, n in shapes)
    return sum(map(min, sizes)) / weights, sum(map(max, sizes)) / weights


def check_target(
    target_bits: float, shapes: list[tuple[int, int]], candidates: list[Candidate]
) -> None:
    """UsageError when `target_bits` is below the smallest or above the largest average the
    candidates reach."""
    low, high = budget_range(shapes, candidates)
    if not low <= target_bits <= high:
        low, high = inward(low, high)
        raise UsageError(
            f"--target-bits {target_bits} is outside what the candidates {_names(candidates)} "
            f"can reach for this model: {low:.4f} to {high:.4f} bits per weight (scales, zeros "
            f"and g_idx counted); choose a target in that range or other --candidates"
        )


def inward(low: float, high: float) -> tuple[float, float]:
    """A bits range rounded inwards to 4 decimals, so that both printed ends are valid targets."""
    return math.ceil(low * 1e4) / 1e4, math.floor(high * 1e4) / 1e4


def _names(candidates: list[Candidate]) -> str:
    return ",".join(c.name for c in candidates)


def allocate(sizes: list[list[int]], losses: list[list[float]], budget: int) -> list[int]:
    """Index of the chosen candidate per module: minimise sum of losses[m][c] with sum of
    sizes[m][c] <= budget.

    sizes: positive integers (bits); losses: finite floats; both [modules][candidates].
    ValueError when even the smallest candidates exceed the budget."""
    if not sizes:
        return []
    if sum(map(min, sizes)) > budget:
        raise ValueError(
            f"the smallest candidates take {sum(map(min, sizes))} bits, over the budget {budget}"
        )
    unit = reduce(math.gcd, [s for row in sizes for s in row], budget) or 1
    if budget // unit > RESOLUTION:
        unit = -(-budget // RESOLUTION)
    cells = budget // unit
    units = [[-(-s // unit) for s in row] for row in sizes]
    # best[s]: least loss of the modules so far within s units
    best = np.zeros(cells + 1)
    picks = np.zeros((len(sizes), cells + 1), dtype=np.int16)
    for m, (row_units, row_losses) in enumerate(zip(units, losses)):
        options = np.full((len(row_units), cells + 1), np.inf)
        for c, (u, loss) in enumerate(zip(row_units, row_losses)):
            if u <= cells:
                options[c, u:] = best[: cells + 1 - u] + loss
        picks[m] = np.argmin(options, axis=0)  # first minimum: ties go to the earlier candidate
        best = options[picks[m], np.arange(cells + 1)]
    if not np.isfinite(best[cells]):
        raise ValueError(
            "no choice of candidates fits the budget once sizes are rounded to the DP's units; "
            "raise the target slightly"
        )
    choice, s = [], cells
    for m in range(len(sizes) - 1, -1, -1):
        c = int(picks[m, s])
        choice.append(c)
        s -= units[m][c]
    return choice[::-1]
