"""config.json that transformers 4.x and 5.x read as the same model.

transformers 5 writes some settings under new names; a 4.x reader (AutoGPTQ, optimum 1.x, older
vLLM/TGI installs) does not know the new names, silently takes its class defaults instead and runs a
different model (e.g. RoPE base 10000 instead of SmolLM2's 100000). So the checkpoint carries the
legacy keys beside the new ones. The renames that touch our registered architectures, read from
transformers' sources:

- `dtype` was `torch_dtype` (4.49 configuration_utils.PretrainedConfig.__init__ pops only
  `torch_dtype`; 4.57 and 5.x read both, `dtype` winning).
- `rope_parameters` was `rope_theta` + `rope_scaling` (+ `partial_rotary_factor`, Phi-3) at the top
  level (4.x
  LlamaConfig/Qwen2Config/MistralConfig/GemmaConfig/Gemma2Config/MixtralConfig/Phi3Config.__init__
  take `rope_theta`, `rope_scaling`; 4.x modeling_rope_utils reads `config.rope_theta`,
  `config.rope_scaling`, `config.partial_rotary_factor`). `rope_scaling` is None for plain RoPE,
  else the rope_parameters without `rope_theta`.
- Gemma3 nests them by layer type: `full_attention` was `rope_theta` + `rope_scaling`,
  `sliding_attention` was `rope_local_base_freq` (always plain RoPE in 4.x: 4.50 modeling_gemma3
  builds the local rotary embedding with rope_scaling {"rope_type": "default"}); `layer_types` was
  `sliding_window_pattern` in 4.50-4.52 (4.50 modeling_gemma3: a layer slides when `(layer_idx + 1)
  % sliding_window_pattern`).
- Phi-3's 4.x Phi3Config._rope_scaling_validation (4.49 up to 4.57) accepts only exactly `{"type":
  "longrope", "short_factor", "long_factor"}`, with `original_max_position_embeddings` top-level.

transformers 5 reads both spellings back as this module writes them (5.x configuration_utils /
modeling_rope_utils.convert_rope_params_to_dict: a non-null `rope_scaling` is taken as the
rope_parameters and `rope_theta` / `partial_rotary_factor` fill in; Gemma3 merges `rope_scaling`
into `full_attention`), so the legacy keys are copies of the new ones and change nothing there.
Tested in tests/test_hf_config.py.
"""

from __future__ import annotations

from typing import Any

# RoPE types transformers 4.49 computes (4.49 modeling_rope_utils.ROPE_INIT_FUNCTIONS).
TRANSFORMERS4_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
_LOCAL, _GLOBAL = "sliding_attention", "full_attention"


def with_legacy_keys(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a transformers-5 config dict with the transformers-4 spellings added beside the
    new keys (keys already present are kept). A nested `text_config` (multimodal wrappers) gets
    the same treatment."""
    out = dict(config)
    for key, value in legacy_keys(config).items():
        out.setdefault(key, value)
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = with_legacy_keys(out["text_config"])
    return out


def legacy_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The transformers-4 keys that say what `config`'s transformers-5 keys say."""
    out: dict[str, Any] = {}
    if config.get("dtype") is not None:
        out["torch_dtype"] = config["dtype"]
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or not rope:
        return out
    if _is_nested(rope):  # Gemma3: per layer type
        full, local = rope.get(_GLOBAL) or {}, rope.get(_LOCAL) or {}
        if "rope_theta" in full:
            out["rope_theta"] = full["rope_theta"]
        out["rope_scaling"] = _scaling(full)
        if "rope_theta" in local:
            out["rope_local_base_freq"] = local["rope_theta"]
        pattern = _sliding_window_pattern(config.get("layer_types"))
        if pattern is not None:
            out["sliding_window_pattern"] = pattern
        return out
    if "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    if "partial_rotary_factor" in rope:
        out["partial_rotary_factor"] = rope["partial_rotary_factor"]
    scaling = _scaling(rope)
    if scaling is not None and config.get("model_type") == "phi3":
        scaling = {
            "type": scaling.get("rope_type"),
            "short_factor": scaling.get("short_factor"),
            "long_factor": scaling.get("long_factor"),
        }
    out["rope_scaling"] = scaling
    return out


def transformers4_gaps(config: dict[str, Any]) -> list[str]:
    """What a transformers-4 reader cannot read as transformers 5 does, even with the legacy
    keys: one reason each, empty when 4.x reads the same model."""
    rope = config.get("rope_parameters")
    gaps = []
    if isinstance(rope, dict) and rope:
        layers = (
            {k: v for k, v in rope.items() if isinstance(v, dict)}
            if _is_nested(rope)
            else {_GLOBAL: rope}
        )
        for layer, params in layers.items():
            kind = params.get("rope_type", params.get("type", "default"))
            if kind not in TRANSFORMERS4_ROPE_TYPES:
                gaps.append(f"RoPE type {kind!r} ({layer}) is unknown to transformers 4.49")
            elif layer == _LOCAL and _scaling(params) is not None:
                gaps.append(
                    "Gemma3's sliding-window layers use scaled RoPE, which transformers 4.x "
                    "cannot express (rope_local_base_freq is plain RoPE)"
                )
        if config.get("model_type") == "phi3" and rope.get("rope_type") == "longrope":
            extra = set(_scaling(rope) or {}) - {
                "rope_type",
                "short_factor",
                "long_factor",
                "original_max_position_embeddings",
            }
            if extra:
                gaps.append(
                    f"Phi-3 longrope keys {sorted(extra)} have no transformers 4.x spelling"
                )
    layer_types = config.get("layer_types")
    if (
        config.get("model_type") == "gemma2"
        and layer_types
        and layer_types != [_LOCAL if i % 2 == 0 else _GLOBAL for i in range(len(layer_types))]
    ):
        # 4.49 modeling_gemma2: `self.is_sliding = not bool(layer_idx % 2)`, layer_types not read
        gaps.append(
            "Gemma2 layer_types other than alternating sliding/full: transformers < 4.53 "
            "assume alternation"
        )
    return gaps


def _is_nested(rope: dict[str, Any]) -> bool:
    return any(key in rope for key in (_LOCAL, _GLOBAL))


def _scaling(params: dict[str, Any]) -> dict[str, Any] | None:
    """4.x's rope_scaling: None for plain RoPE, else everything but the base (which 4.x keeps
    top-level)."""
    rest = {
        k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor", "type")
    }
    if rest.get("rope_type", "default") == "default" and set(rest) <= {"rope_type"}:
        return None
    return rest


def _sliding_window_pattern(layer_types: Any) -> int | None:
    """The 4.50-4.52 Gemma3 `sliding_window_pattern` p that gives these layer types (layer i full
    when (i + 1) % p == 0), or None when no such p exists (all sliding: any p beyond the layer
    count)."""
    if not isinstance(layer_types, list) or not layer_types:
        return None
    n = len(layer_types)
    for p in range(1, n + 2):
        if layer_types == [_LOCAL if (i + 1) % p else _GLOBAL for i in range(n)]:
            return p if p <= n else max(p, 6)  # all sliding: 6, transformers' default, when it fits
    return None
