"""The --target-bits knapsack (allocate.py) and the per-module settings in
quantization_config["dynamic"]."""

import itertools
import math
import random
import re

import pytest
import torch

from gptq_cli.errors import UsageError
from gptq_cli.format.config import QuantConfig
from gptq_cli.format.dynamic import encode, module_key, resolve
from gptq_cli.quantization.allocate import (
    Candidate,
    allocate,
    average_bits,
    budget_range,
    check_target,
    parse_candidates,
    stored_bits,
)
from gptq_cli.quantization.quantizer import quantize_rtn


@pytest.mark.parametrize(
    "bits,group_size,k,n",
    [(3, 32, 100, 40), (4, 128, 576, 192), (2, -1, 64, 48), (8, 64, 96, 36), (3, 128, 576, 1536)],
)
def test_stored_bits_counts_what_the_file_stores(bits, group_size, k, n):
    qw = quantize_rtn(torch.randn(n, k), bits=bits, group_size=group_size, sym=True)
    stored = sum(t.numel() * t.element_size() * 8 for t in qw.to_tensors().values())
    assert stored_bits(k, n, Candidate(bits, group_size)) == stored


def brute_force(sizes, losses, budget):
    best = None
    for combo in itertools.product(*(range(len(r)) for r in sizes)):
        if sum(sizes[m][c] for m, c in enumerate(combo)) <= budget:
            loss = sum(losses[m][c] for m, c in enumerate(combo))
            if best is None or loss < best - 1e-12:
                best = loss
    return best


def test_allocation_is_optimal_and_within_budget_on_small_instances():
    rng = random.Random(0)
    for _ in range(60):
        modules, cands = rng.randint(1, 5), rng.randint(1, 4)
        sizes = [[rng.randint(1, 40) for _ in range(cands)] for _ in range(modules)]
        losses = [[round(rng.uniform(0, 10), 3) for _ in range(cands)] for _ in range(modules)]
        budget = rng.randint(sum(map(min, sizes)), sum(map(max, sizes)))
        choice = allocate(sizes, losses, budget)
        assert sum(sizes[m][c] for m, c in enumerate(choice)) <= budget
        assert sum(losses[m][c] for m, c in enumerate(choice)) == pytest.approx(
            brute_force(sizes, losses, budget)
        )


def test_allocation_with_coarse_units_keeps_the_budget_and_is_deterministic():
    rng = random.Random(1)
    shapes = [(rng.choice([576, 1536]), rng.choice([192, 576, 1536])) for _ in range(200)]
    cands = parse_candidates(None)
    sizes = [[stored_bits(k, n, c) for c in cands] for k, n in shapes]
    losses = [
        [rng.uniform(0, 1) * 4.0**-c.bits * (64 + c.group_size) for c in cands] for _ in shapes
    ]
    budget = int(3.25 * sum(k * n for k, n in shapes))
    choice = allocate(sizes, losses, budget)
    assert sum(sizes[m][c] for m, c in enumerate(choice)) <= budget
    assert average_bits(shapes, [cands[c] for c in choice]) <= 3.25
    assert allocate(sizes, losses, budget) == choice
    # the rounding slack is small: most of the budget is used
    assert sum(sizes[m][c] for m, c in enumerate(choice)) > 0.99 * budget


def test_ties_go_to_the_earlier_candidate():
    assert allocate([[4, 4, 4]], [[1.0, 1.0, 1.0]], 4) == [0]


def test_target_outside_the_achievable_range_is_a_usage_error():
    shapes = [(576, 576), (576, 1536)]
    cands = parse_candidates("3g128,4g128")
    low, high = budget_range(shapes, cands)
    assert low == pytest.approx(average_bits(shapes, [cands[0]] * 2))
    check_target(low, shapes, cands)
    for bad in (low - 0.01, high + 0.01):
        with pytest.raises(
            UsageError,
            match=re.escape(
                f"{math.ceil(low * 1e4) / 1e4:.4f} to {math.floor(high * 1e4) / 1e4:.4f}"
            ),
        ) as info:
            check_target(bad, shapes, cands)
        printed = [
            float(v) for v in re.findall(r"(\d+\.\d{4}) to (\d+\.\d{4})", str(info.value))[0]
        ]
        for valid in printed:  # both printed ends are accepted targets
            check_target(valid, shapes, cands)


def test_parse_candidates():
    assert parse_candidates("4g128, 3g64,4g128") == [Candidate(3, 64), Candidate(4, 128)]
    assert parse_candidates("bits=3,4 group=64,-1") == [
        Candidate(3, -1),
        Candidate(3, 64),
        Candidate(4, -1),
        Candidate(4, 64),
    ]
    assert len(parse_candidates(None)) == 12
    for bad in ("4bit", "5g128", "bits=4", "4g0"):
        with pytest.raises(UsageError):
            parse_candidates(bad)


def test_dynamic_encoding_round_trips_through_quant_config():
    settings = {
        "model.layers.0.self_attn.q_proj": (4, 128),
        "model.layers.0.mlp.down_proj": (3, 64),
        "model.layers.1.self_attn.q_proj": (4, 128),
        "model.layers.10.mlp.down_proj": (8, 32),
    }
    top, dynamic = encode(settings)
    assert top == (4, 128)
    assert list(dynamic) == [
        module_key("model.layers.0.mlp.down_proj"),
        module_key("model.layers.10.mlp.down_proj"),
    ]
    assert dynamic[module_key("model.layers.0.mlp.down_proj")] == {"bits": 3, "group_size": 64}
    quant = QuantConfig.from_hf_dict(
        QuantConfig(bits=top[0], group_size=top[1], dynamic=dynamic).to_hf_dict()
    )
    for name, setting in settings.items():
        assert quant.module_setting(name) == setting
    # escaped dots and the end anchor: layer 1 is not layer 10, and "X" is not a dot
    assert quant.module_setting("model.layers.1.mlp.down_proj") == (4, 128)
    assert quant.module_setting("model.layers.0.mlpXdown_proj") == (4, 128)
    assert "dynamic" not in QuantConfig().to_hf_dict()


def test_dynamic_first_match_wins_and_negative_excludes():
    dynamic = {
        "-:.*lm_head": {},
        "+:.*down_proj": {"bits": 8},
        r"+:^model\.layers\.0\..*": {"bits": 2},
    }
    assert resolve(dynamic, "lm_head") is None
    assert resolve(dynamic, "model.layers.0.mlp.down_proj") == {"bits": 8}
    assert QuantConfig(dynamic=dynamic).module_setting("model.layers.0.mlp.up_proj") == (2, 128)
    with pytest.raises(ValueError):
        QuantConfig(dynamic={"+:(": {"bits": 4}})
