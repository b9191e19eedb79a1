"""Quantization settings and the `quantization_config` dict that config.json /
quantize_config.json carry."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from gptq_cli import __version__
from gptq_cli.format.dynamic import check_dynamic, module_setting

BITS = (2, 3, 4, 8)  # the widths GPTQ checkpoints pack (format/bitpack.py) and their loaders read
FORMATS = ("gptq", "gptq_v2")


def check_bits(bits: int) -> None:
    """ValueError unless GPTQ checkpoints can hold `bits`-bit codes (BITS)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")


def check_setting(bits: int, group_size: int, damp_percent: float | None = None) -> None:
    """ValueError unless bits, group size (-1: per channel) and damping fraction (when given) are
    usable: the checks QuantConfig makes, also asked by the solver of its arguments."""
    check_bits(bits)
    if group_size != -1 and group_size < 1:
        raise ValueError(f"group_size must be a positive integer or -1, got {group_size}")
    if damp_percent is not None and not 0 < damp_percent < 1:
        raise ValueError(f"damp_percent must be in (0, 1), got {damp_percent}")


@dataclass
class QuantConfig:
    """Everything that decides a GPTQ result. Field names follow the field's conventions
    (AutoGPTQ/GPTQModel)."""

    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    static_groups: bool = False
    act_group_aware: bool = True  # group-aware act-order when desc_act is off (g_idx stays k // g)
    true_sequential: bool = True
    damp_percent: float = 0.01
    mse: bool = False
    # None: "gptq" (v1) when symmetric, "gptq_v2" when not (v1 cannot store an asymmetric zero)
    checkpoint_format: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # per-module overrides (format/dynamic.py); None: all modules alike
    dynamic: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_setting(self.bits, self.group_size, self.damp_percent)
        if self.checkpoint_format is None:
            self.checkpoint_format = "gptq" if self.sym else "gptq_v2"
        if self.checkpoint_format not in FORMATS:
            raise ValueError(
                f"checkpoint_format must be one of {FORMATS}, got {self.checkpoint_format!r}"
            )
        if self.dynamic is not None:
            check_dynamic(self.dynamic)
            for override in self.dynamic.values():
                if override.get("bits", self.bits) not in BITS:
                    raise ValueError(f"dynamic override {override}: bits must be one of {BITS}")
        if not self.sym and self.checkpoint_format == "gptq":
            # v1 stores zero - 1: an asymmetric zero of 0 does not fit (SPEC §2)
            raise ValueError(
                "--asym needs --format gptq_v2: format gptq (v1) stores zero - 1 and cannot hold "
                "an asymmetric zero of 0; drop --format gptq (asym is then written as gptq_v2)"
            )

    def to_hf_dict(self) -> dict[str, Any]:
        """The quantization_config dict, as transformers / GPTQModel / AutoGPTQ / vLLM read it."""
        d = {
            k: v
            for k, v in asdict(self).items()
            if k not in ("mse", "act_group_aware", "meta", "dynamic")
        }
        if self.dynamic:
            d["dynamic"] = self.dynamic
        d.update(quant_method="gptq", lm_head=False, pack_dtype="int32")
        # desc_act tells a loader that g_idx is not k // group_size. With static groups (or one
        # group per row) act-order only changed the solving order and g_idx is k // group_size: the
        # file says desc_act false, which every loader serves (vLLM 0.32 refuses desc_act true), and
        # meta keeps the solving order.
        d["desc_act"] = self.desc_act and not self.trivial_g_idx
        # How the columns were ordered while solving changes nothing a loader reads: it goes in
        # meta, where GPTQModel records it too (act-order proper is desc_act, which loaders do
        # read).
        d["meta"] = {
            "quantizer": [f"gptq_cli:{__version__}"],
            "mse": self.mse,
            "act_group_aware": self.act_group_aware and not self.desc_act,
            **({"act_order": True} if self.desc_act and self.trivial_g_idx else {}),
            **self.meta,
        }
        return d

    @property
    def trivial_g_idx(self) -> bool:
        """Whether every module's g_idx is k // group_size (no act-order, static groups, or per
        channel)."""
        return not self.desc_act or self.static_groups or self.group_size == -1

    def module_setting(self, name: str) -> tuple[int, int]:
        """(bits, group_size) of the module with full name `name`, after any `dynamic` override."""
        return module_setting(self.dynamic, name, (self.bits, self.group_size))

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """Read a quantization_config written by us, GPTQModel or AutoGPTQ (extra keys ignored).

        GPTQModel 7 moved damp_percent, static_groups, true_sequential and mse into `meta`: a
        top-level key wins, the meta one fills in. Raises ValueError for settings this package
        cannot represent."""
        meta = d.get("meta") if isinstance(d.get("meta"), dict) else {}
        merged = {
            **{k: meta[k] for k in _META_SETTINGS if meta.get(k) is not None},
            **{k: v for k, v in d.items() if v is not None},
        }
        names = {f.name for f in fields(cls)} - {"meta", "mse", "checkpoint_format", "sym"}
        kwargs = {k: merged[k] for k in names if k in merged}
        fmt = d.get("checkpoint_format") or d.get("format") or "gptq"
        if fmt not in FORMATS:
            raise ValueError(
                f"checkpoint_format {fmt!r} is not a GPTQ format this tool reads "
                f"({', '.join(FORMATS)})"
            )
        # sym=False with a v1 label is legal to read (older tools wrote it); only writing forces v2,
        # so the object is built symmetric and sym is set afterwards, past __post_init__.
        # absent: plain order
        kwargs["act_group_aware"] = bool(merged.get("act_group_aware", False))
        kwargs["desc_act"] = bool(merged.get("desc_act", False) or meta.get("act_order", False))
        cfg = cls(
            **kwargs,
            sym=True,
            checkpoint_format=fmt,
            mse=bool(merged.get("mse", False)),
            meta=dict(meta),
        )
        cfg.sym = bool(merged.get("sym", True))
        return cfg


# Settings GPTQModel 7 writes under quantization_config["meta"] rather than at the top level.
_META_SETTINGS = ("damp_percent", "static_groups", "true_sequential", "mse", "act_group_aware")
