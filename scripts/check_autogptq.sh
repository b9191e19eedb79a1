#!/usr/bin/env bash
# Load GPTQ checkpoints through loaders of the transformers-4 generation and compare their logits with ours.
#
#   scripts/check_autogptq.sh CHECKPOINT [CHECKPOINT ...]
#
# Builds (once) its own venv outside the repo with the pins AutoGPTQ users have: torch 2.13.0 CPU (installed
# first so that no CUDA torch is pulled), transformers 4.49.0, optimum 1.24.0, peft 0.13.2, auto-gptq 0.7.1
# built with BUILD_CUDA_EXT=0. For each checkpoint: our loader (main venv, fp16) writes its logits; AutoGPTQ's
# from_quantized and transformers + optimum (AutoGPTQ venv) load the same files and are compared with them
# (cosine, max |diff|, top-1 agreement on 2 x 64 fixed tokens), next to what `gptq inspect` predicts for them.
# A checkpoint with tied embeddings is also tried with lm_head.weight written out, and every one with its
# config.json stripped of the transformers-4 keys (as gptq wrote it before they were added). Finally every registered
# architecture's config.json, as our writer writes it, is read by the real transformers 4.49 and by
# transformers 5: dtype and rotary frequencies must agree. Writes bench/interop_autogptq.json.
#
# Environment: AUTOGPTQ_VENV (default /work/venv-autogptq), MAIN_PYTHON (default: python on PATH, which must
# import gptq_cli), OUT (default bench/interop_autogptq.json). Not part of the test suite: the install is heavy.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${AUTOGPTQ_VENV:-/work/venv-autogptq}
MAIN_PYTHON=${MAIN_PYTHON:-python}
OUT=${OUT:-$REPO/bench/interop_autogptq.json}
HELPER=$REPO/scripts/interop_autogptq.py
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

if [ $# -lt 1 ]; then
  echo "usage: $0 CHECKPOINT [CHECKPOINT ...]" >&2
  exit 2
fi
for ckpt in "$@"; do
  [ -f "$ckpt/config.json" ] || { echo "$ckpt is not a checkpoint directory (no config.json)" >&2; exit 2; }
done

if [ ! -f "$VENV/.pins-ok" ]; then
  echo "building $VENV (torch 2.13.0 CPU, transformers 4.49.0, optimum 1.24.0, peft 0.13.2, auto-gptq 0.7.1)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q transformers==4.49.0 optimum==1.24.0 peft==0.13.2
  BUILD_CUDA_EXT=0 "$VENV/bin/pip" install -q --no-build-isolation --no-binary auto-gptq auto-gptq==0.7.1
  touch "$VENV/.pins-ok"
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
RESULTS=$WORK/results.jsonl
i=0
for ckpt in "$@"; do
  i=$((i + 1))
  variants=("$ckpt")
  untied=$("$MAIN_PYTHON" "$HELPER" untie "$ckpt" "$WORK/untied$i" 2>/dev/null)
  [[ $untied == *'"untied": "'* ]] && variants+=("$WORK/untied$i")
  stripped=$("$MAIN_PYTHON" "$HELPER" strip "$ckpt" "$WORK/stripped$i" 2>/dev/null)
  [[ $stripped == *'"stripped": "'* ]] && variants+=("$WORK/stripped$i")
  for v in "${variants[@]}"; do
    echo "checking $v" >&2
    ours=$("$MAIN_PYTHON" "$HELPER" ours "$v" "$WORK/ours.pt" 2>/dev/null)
    theirs=$("$VENV/bin/python" "$HELPER" theirs "$v" "$WORK/ours.pt" 2>/dev/null)
    case $v in
      */untied*) label="$(basename "$ckpt") + lm_head.weight written out" ;;
      */stripped*) label="$(basename "$ckpt") with config.json as before the fix (no transformers-4 keys)" ;;
      *) label=$(basename "$ckpt") ;;
    esac
    printf '{"checkpoint": "%s", "ours": %s, "theirs": %s}\n' "$label" "$ours" "$theirs" >> "$RESULTS"
  done
done

echo "reading every architecture's config.json with transformers 4.49 and 5" >&2
"$MAIN_PYTHON" "$HELPER" configs "$WORK/configs" > /dev/null
"$MAIN_PYTHON" "$HELPER" rope "$WORK/configs" 2>/dev/null > "$WORK/rope5.json"
"$VENV/bin/python" "$HELPER" rope "$WORK/configs" 2>/dev/null > "$WORK/rope4.json"

"$MAIN_PYTHON" - "$RESULTS" "$WORK/rope5.json" "$WORK/rope4.json" "$OUT" "$VENV" <<'EOF'
import json, platform, subprocess, sys
results, rope5, rope4, out, venv = sys.argv[1:]
rope5, rope4 = json.load(open(rope5)), json.load(open(rope4))
versions = subprocess.run([f"{venv}/bin/python", "-c", "import torch, transformers, optimum.version, peft, auto_gptq; "
                           "print(torch.__version__, transformers.__version__, optimum.version.__version__, "
                           "peft.__version__, auto_gptq.__version__)"], capture_output=True, text=True).stdout.split()
import torch, transformers
def measured_ok(r):
    return "error" not in r and r["cosine"] > 0.999 and r["top1_agree"] == r["positions"]
names = {"autogptq": "AutoGPTQ 0.7.1", "transformers4_optimum": "transformers 4.49 + optimum 1.24"}
checkpoints = [json.loads(line) for line in open(results)]
for c in checkpoints:
    predicted = {v["loader"]: v["loads"] for v in c["ours"]["loaders"]}
    c["prediction_vs_measurement"] = {k: {"predicted_loads": predicted[names[k]], "measured_same_logits":
                                          measured_ok(r)} for k, r in c["theirs"].items()}
configs = {name: ("same" if rope4[name] == rope5[name] else "transformers 4.49 cannot read it: " + rope4[name]
                  if isinstance(rope4[name], str) else "DIFFERENT") for name in rope5}
report = {
    "what": "GPTQ checkpoints loaded by AutoGPTQ and by transformers+optimum (transformers 4.x generation) vs "
            "gptq_cli's loader; logits on 2x64 fixed token ids, fp16 on CPU; scripts/check_autogptq.sh",
    "machine": f"{platform.machine()} {platform.processor() or ''} shared 2-core CPU".strip(),
    "versions": {"autogptq_venv": dict(zip(["torch", "transformers", "optimum", "peft", "auto_gptq"], versions)),
                 "main_venv": {"torch": torch.__version__, "transformers": transformers.__version__}},
    "all_predictions_hold": all(p["predicted_loads"] == p["measured_same_logits"] for c in checkpoints
                                for p in c["prediction_vs_measurement"].values()),
    "checkpoints": checkpoints,
    "config_reading": {"what": "each registered architecture's config.json as our writer writes it (non-default "
                               "RoPE base and scaling, bf16): dtype and rotary inv_freq read by the real "
                               "transformers 4.49 vs transformers 5", "result": configs},
}
open(out, "w").write(json.dumps(report, indent=1) + "\n")
print(f"wrote {out}", file=sys.stderr)
EOF
