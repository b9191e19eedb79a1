"""The Python half of scripts/check_autogptq.sh: each mode runs in one of the two venvs.

main venv (gptq_cli, transformers 5):
  ours CKPT OUT.pt      our loader's logits (fp16, as the 4.x loaders compute on CPU) on fixed
                        token ids
  untie CKPT OUT_DIR    a copy of CKPT with lm_head.weight written out, if it is tied and lacks one
  strip CKPT OUT_DIR    a copy of CKPT whose config.json lacks the transformers-4 keys (as before
                        the fix)
  configs OUT_DIR       every registered architecture's config.json as our writer writes it
                        (non-default RoPE)
either venv:
  rope DIR              per config: the dtype this transformers reads and every rotary inv_freq it
                        computes
AutoGPTQ venv (auto-gptq 0.7.1, transformers 4.49, optimum 1.24):
  theirs CKPT OURS.pt   logits of AutoGPTQ.from_quantized and of transformers+optimum, compared with
                        ours
Results are printed as one JSON object on stdout.
"""

from __future__ import annotations

import json
import shutil
import sys
import traceback
from pathlib import Path

import torch

SEQS, SEQLEN = 2, 64


def token_ids(vocab_size: int) -> torch.Tensor:
    """Fixed token ids that avoid the first ids (special tokens in both tokenizers used here)."""
    return torch.randint(3, vocab_size, (SEQS, SEQLEN), generator=torch.Generator().manual_seed(0))


def ours(ckpt: str, out: str) -> dict:
    from gptq_cli.inspection import inspect_checkpoint
    from gptq_cli.model.loader import load_quantized_model

    model = load_quantized_model(ckpt, dtype=torch.float16)
    ids = token_ids(model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    torch.save({"ids": ids, "logits": logits}, out)
    return {"loaders": inspect_checkpoint(ckpt).to_dict()["loaders"]}


def untie(ckpt: str, out_dir: str) -> dict:
    """Only for a single-file checkpoint of a model with tied embeddings that does not store
    lm_head.weight."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    config = json.loads((Path(ckpt) / "config.json").read_text())
    weights = Path(ckpt) / "model.safetensors"
    if (
        not config.get("tie_word_embeddings")
        or not weights.is_file()
        or "lm_head.weight" in safe_open(str(weights), "pt").keys()
    ):
        return {"untied": None}
    shutil.copytree(ckpt, out_dir)
    tensors = load_file(str(Path(out_dir) / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(Path(out_dir) / "model.safetensors"), metadata={"format": "pt"})
    return {"untied": out_dir}


def strip(ckpt: str, out_dir: str) -> dict:
    """A copy of CKPT whose config.json lacks the transformers-4 spellings, as gptq wrote it
    before they were added (only when it has them to remove)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gptq_cli.format.hf_config import legacy_keys

    config = json.loads((Path(ckpt) / "config.json").read_text())
    stale = {k: v for k, v in config.items() if k != "quantization_config"}
    removed = sorted(k for k in legacy_keys(stale) if k in config)
    if not removed:
        return {"stripped": None}
    shutil.copytree(ckpt, out_dir)
    (Path(out_dir) / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k not in removed})
    )
    return {"stripped": out_dir, "removed": removed}


def configs(out_dir: str) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gptq_cli.format.hf_config import with_legacy_keys
    from tests.test_hf_config import VARIANTS, variant_config

    for name in VARIANTS:
        d = Path(out_dir) / name
        d.mkdir(parents=True)
        config = with_legacy_keys(variant_config(name, torch.bfloat16).to_dict())
        (d / "config.json").write_text(json.dumps(config, indent=1))
    return {"configs": sorted(VARIANTS)}


def rope(config_dir: str) -> dict:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    result = {}
    for d in sorted(Path(config_dir).iterdir()):
        try:
            config = AutoConfig.from_pretrained(d)
            model = AutoModelForCausalLM.from_config(config)
        except Exception as e:  # an architecture this transformers does not know
            result[d.name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            continue
        dtype = config.dtype if transformers.__version__ >= "5" else config.torch_dtype
        freqs = set()
        for module in model.modules():
            for name, buf in module.named_buffers(recurse=False):
                if name.endswith("inv_freq") and "original" not in name:
                    freqs.add(tuple(round(x, 7) for x in buf.tolist()))
        result[d.name] = {"dtype": str(dtype).removeprefix("torch."), "inv_freq": sorted(freqs)}
    return result


def _compare(logits: torch.Tensor, ref: torch.Tensor) -> dict:
    logits, ref = (
        logits.float().reshape(-1, logits.shape[-1]),
        ref.float().reshape(-1, ref.shape[-1]),
    )
    return {
        "cosine": round(
            torch.nn.functional.cosine_similarity(
                logits.flatten().double(), ref.flatten().double(), dim=0
            ).item(),
            6,
        ),
        "max_abs_diff": round((logits - ref).abs().max().item(), 4),
        "top1_agree": int((logits.argmax(-1) == ref.argmax(-1)).sum()),
        "positions": logits.shape[0],
    }


def _run(fn) -> dict:
    try:
        return fn()
    except Exception as e:
        last = traceback.extract_tb(e.__traceback__)[-1]
        return {
            "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}",
            "at": f"{Path(last.filename).name}:{last.lineno}",
        }


def theirs(ckpt: str, ours_file: str) -> dict:
    ref = torch.load(ours_file)
    ids = ref["ids"]

    def autogptq() -> dict:
        from auto_gptq import AutoGPTQForCausalLM

        model = AutoGPTQForCausalLM.from_quantized(
            ckpt,
            device="cpu",
            use_safetensors=True,
            use_triton=False,
            disable_exllama=True,
            disable_exllamav2=True,
        )
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        emb = model.model.get_input_embeddings().weight
        return {**_compare(logits, ref["logits"]), "embedding_all_zero": bool((emb == 0).all())}

    def transformers_optimum() -> dict:
        from transformers import AutoConfig, AutoModelForCausalLM, GPTQConfig

        config = AutoConfig.from_pretrained(ckpt)
        model = AutoModelForCausalLM.from_pretrained(
            ckpt,
            device_map="cpu",
            quantization_config=GPTQConfig(
                bits=config.quantization_config["bits"], use_exllama=False
            ),
        )
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        return {
            **_compare(logits, ref["logits"]),
            "rope_theta_read": getattr(config, "rope_theta", None),
            "torch_dtype_read": str(config.torch_dtype),
        }

    return {"autogptq": _run(autogptq), "transformers4_optimum": _run(transformers_optimum)}


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    modes = {
        "ours": ours,
        "untie": untie,
        "strip": strip,
        "configs": configs,
        "rope": rope,
        "theirs": theirs,
    }
    print(json.dumps(modes[mode](*args)))
