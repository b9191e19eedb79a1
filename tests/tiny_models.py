"""Tiny random transformers models for tests: built from configs, never downloaded (SPEC §5).

    from tests.tiny_models import make_tiny_model, save_tiny_model
    model = make_tiny_model("llama")                  # a random LlamaForCausalLM, fp32, eval mode
    path = save_tiny_model(tmp_path / "m", "llama")   # the same, saved with a small tokenizer
    ckpt = write_random_gptq_checkpoint(tmp_path / "q", path, QuantConfig(bits=4, group_size=64))
    ref = ckpt.reference_model()                      # what loading ckpt.path must compute

Every architecture SPEC §3 names has an entry in TINY_CONFIGS. Dimensions are multiples of 64 so
that GPTQ group sizes 32/64/128 and every kernel's divisibility rules apply; `overrides` changes any
config field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from gptq_cli.format.checkpoint import quantized_to_tensors, write_checkpoint
from gptq_cli.format.config import QuantConfig
from gptq_cli.format.quantized import QuantizedWeight

VOCAB_SIZE = 512
# The special token ids of make_tiny_tokenizer(); configs default to ids outside the tiny
# vocabulary.
_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)

# Common decoder dimensions: hidden 256 = 4 heads x 64, MLP 768, 2 layers.
_DECODER = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    **_TOKENS,
)

TINY_CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "llama": lambda: transformers.LlamaConfig(**_DECODER),
    "mistral": lambda: transformers.MistralConfig(**_DECODER, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**_DECODER),
    "qwen3": lambda: transformers.Qwen3Config(**_DECODER, head_dim=64),
    "gemma": lambda: transformers.GemmaConfig(
        **{**_DECODER, "tie_word_embeddings": True}, head_dim=64
    ),
    "gemma2": lambda: transformers.Gemma2Config(
        **{**_DECODER, "tie_word_embeddings": True}, head_dim=64
    ),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **{**_DECODER, "tie_word_embeddings": True}, head_dim=64
    ),
    "phi3": lambda: transformers.Phi3Config(**_DECODER),
    "mixtral": lambda: transformers.MixtralConfig(
        **_DECODER, num_local_experts=4, num_experts_per_tok=2
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **_DECODER,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=256,
        shared_expert_intermediate_size=256,
    ),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        ffn_dim=768,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=256,
        max_position_embeddings=256,
        **_TOKENS,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB_SIZE, n_embd=256, n_layer=2, n_head=4, n_positions=256, **_TOKENS
    ),
}


def tiny_config(arch: str = "llama", **overrides: Any) -> transformers.PretrainedConfig:
    """The tiny config of `arch` (a key of TINY_CONFIGS) with `overrides` applied."""
    if arch not in TINY_CONFIGS:
        raise KeyError(f"no tiny config for {arch!r}; known: {sorted(TINY_CONFIGS)}")
    config = TINY_CONFIGS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def make_tiny_model(
    arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> transformers.PreTrainedModel:
    """A randomly initialised causal LM of `arch`, deterministic for a given seed, in eval mode."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    return model.to(dtype).eval()


def make_tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over VOCAB_SIZE made-up words ("w0" .. ), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {
        tok: i
        for i, tok in enumerate(specials + [f"w{i}" for i in range(VOCAB_SIZE - len(specials))])
    }
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
    )


def save_tiny_model(
    path: str | Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    **overrides: Any,
) -> Path:
    """Save a tiny random model (safetensors, `dtype`) plus its tokenizer to `path`, as a Hub
    download looks."""
    path = Path(path)
    make_tiny_model(arch, seed=seed, dtype=dtype, **overrides).save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


def random_input_ids(batch: int = 2, seqlen: int = 16, *, seed: int = 0) -> torch.Tensor:
    """Token ids that avoid the special tokens, deterministic for a given seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE, (batch, seqlen), generator=gen)


def random_quantized_weight(
    out_features: int,
    in_features: int,
    *,
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    sym: bool = True,
    v1_storable: bool = True,
    seed: int = 0,
) -> QuantizedWeight:
    """Random codes/scales/zeros/g_idx of one linear, with weights of about the std of a fresh init
    (0.02).

    act_order: g_idx of a random column permutation (the layout act-order leaves behind), else k //
    group.
    v1_storable: asymmetric zeros >= 1, so that format "gptq" (zero - 1) can store them.
    """
    gen = torch.Generator().manual_seed(seed)
    group = in_features if group_size == -1 else group_size
    groups = -(-in_features // group)
    maxq = (1 << bits) - 1
    codes = torch.randint(
        0, maxq + 1, (out_features, in_features), generator=gen, dtype=torch.int32
    )
    base = 0.02 * 12**0.5 / (maxq + 1)  # uniform codes -> weight std ~0.02
    scales = (base * (0.5 + torch.rand(groups, out_features, generator=gen))).to(torch.float16)
    if sym:
        zeros = torch.full((groups, out_features), (maxq + 1) // 2, dtype=torch.int32)
    else:
        zeros = torch.randint(
            int(v1_storable), maxq + 1, (groups, out_features), generator=gen, dtype=torch.int32
        )
    if act_order:
        position = torch.argsort(torch.randperm(in_features, generator=gen))  # where column k went
        g_idx = (position // group).to(torch.int32)
    else:
        g_idx = (torch.arange(in_features) // group).to(torch.int32)
    return QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size)


def quantizable_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every nn.Linear / GPT-2 Conv1D of the model except the output head, by module name."""
    head = model.get_output_embeddings()
    return {
        name: m
        for name, m in model.named_modules()
        if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and m is not head
    }


def linear_shape(module: torch.nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or a Conv1D (whose weight is stored [K, N])."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if type(module).__name__ == "Conv1D" else tuple(w.shape)


@dataclass
class RandomGptqCheckpoint:
    """A GPTQ checkpoint written from known random quantized weights, with everything to rebuild
    it."""

    path: Path
    src: Path  # the full-precision tiny model it was made from
    quant: QuantConfig
    weights: dict[str, QuantizedWeight]  # module name -> its quantized weight
    biases: dict[str, torch.Tensor]  # module name -> bias (only for modules that have one)

    def reference_model(self, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
        """The source model with each quantized linear's weight set to the dequantized weight: an
        independent computation of what loading this checkpoint must give (plain nn.Linear, no
        packing involved)."""
        model = transformers.AutoModelForCausalLM.from_pretrained(self.src, dtype=dtype).eval()
        with torch.no_grad():
            for name, qw in self.weights.items():
                module = model.get_submodule(name)
                w = qw.dequantize(dtype)
                module.weight.copy_(w.t() if type(module).__name__ == "Conv1D" else w)
                if name in self.biases:
                    module.bias.copy_(self.biases[name].to(dtype))
        return model


def write_random_gptq_checkpoint(
    out_dir: str | Path, src: str | Path, quant: QuantConfig, *, seed: int = 0, **write_kwargs: Any
) -> RandomGptqCheckpoint:
    """Quantize nothing: give every linear of the saved model at `src` random codes (act-order
    g_idx when quant.desc_act) and write the GPTQ checkpoint with gptq_cli's writer.
    Non-quantized tensors and biases keep the model's stored dtype."""
    src, out_dir = Path(src), Path(out_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    weights, biases, tensors = {}, {}, {}
    for i, (name, module) in enumerate(sorted(quantizable_linears(model).items())):
        n, k = linear_shape(module)
        qw = random_quantized_weight(
            n,
            k,
            bits=quant.bits,
            group_size=quant.group_size,
            act_order=quant.desc_act,
            sym=quant.sym,
            v1_storable=quant.checkpoint_format == "gptq",
            seed=seed + i,
        )
        weights[name] = qw
        if module.bias is not None:
            gen = torch.Generator().manual_seed(seed + 10_000 + i)
            biases[name] = (0.02 * torch.randn(n, generator=gen)).to(module.bias.dtype)
        tensors.update(
            quantized_to_tensors(name, qw, quant.checkpoint_format, bias=biases.get(name))
        )
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] not in weights and key not in tied:
            tensors[key] = value
    write_checkpoint(out_dir, tensors, model.config, quant, src_dir=src, **write_kwargs)
    return RandomGptqCheckpoint(out_dir, src, quant, weights, biases)
