#!/usr/bin/env bash
# One-call device check of the GPU path (issue 14): at most 8 minutes on a bare GPU machine with no network,
# at most 8 JSON files into OUTDIR.
#
#   scripts/device_check.sh OUTDIR          # on the GPU machine, from the repository root or anywhere
#   scripts/device_check.sh OUTDIR --cpu    # every step that can run on a CPU, at toy sizes
#
# Steps (each bounded by `timeout`, the whole run by BUDGET seconds; a step that fails is recorded and the
# next one runs, except the build: without the extension nothing else means anything, so the run stops):
#   env.json       device, driver, torch, CUDA and nvcc versions, the command, every step's status and time
#   build.json     the extension built in place for this GPU (setup.py build_ext --inplace);
#                  with --cpu: the nvcc compile checks of csrc/ (tests/test_csrc_compile.py) instead
#   tests.json     the `cuda` tests of the kernels, QuantLinear and the GPU path (with --cpu: the emulated ones)
#   kernels.json   GEMV (M = 1/4/8, ordered and act-order, fp16 and bf16) vs fp16 F.linear and the measured
#                  copy bandwidth; block kernel vs torch column loop on 4096x4096
#   quantize.json  7B-shaped quantize at 128x2048: per-phase timers, peak GPU memory, per-layer times and the
#                  32-layer extrapolation; recording all inputs vs the default; decode tokens/s 4-bit vs fp16
#   ppl.json       a tiny model's perplexity quantized and evaluated on CUDA vs on the CPU (within 1%); the
#                  default method (gptaq-ls, two activation streams) quantized on CUDA vs on the CPU
set -u
OUTDIR=${1:?usage: scripts/device_check.sh OUTDIR [--cpu]}
MODE=${2:-gpu}
BUDGET=${BUDGET:-470}
START=$(date +%s)
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
LOGS=/tmp/gptq_device_check_logs
mkdir -p "$LOGS"
CPU_FLAG=""
[ "$MODE" = "--cpu" ] && CPU_FLAG="--cpu"
STATUS=""

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# run NAME LIMIT CMD...: run a step under min(LIMIT, time left), log to $LOGS/NAME.log, note its status.
run() {
  local name=$1 limit=$2; shift 2
  local remaining; remaining=$(left)
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  if [ "$limit" -le 5 ]; then STATUS+="$name=skipped(no time) "; echo "== $name: skipped, no time left"; return 1; fi
  echo "== $name (up to ${limit}s)"
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$LOGS/$name.log"
  STATUS+="$name=rc$rc/$(( $(date +%s) - t0 ))s "
  echo "== $name: exit $rc after $(( $(date +%s) - t0 ))s"
  return $rc
}

# log_json NAME RC: OUTDIR/NAME.json holding the step's exit code and the end of its log.
log_json() {
  "$PY" - "$1" "$2" "$LOGS/$1.log" "$OUTDIR/$1.json" <<'EOF'
import json, re, sys
name, rc, log, out = sys.argv[1], int(sys.argv[2]), open(sys.argv[3], errors="replace").read(), sys.argv[4]
report = {"step": name, "exit_code": rc, "ok": rc == 0, "log_tail": log[-6000:]}
counts = re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", log)
if counts:
    report["counts"] = {kind: int(n) for n, kind in counts}
json.dump(report, open(out, "w"), indent=2)
EOF
}

write_env() {
  "$PY" - "$OUTDIR/env.json" "$MODE" "$STATUS" "$(( $(date +%s) - START ))" "$*" <<'EOF'
import json, platform, shutil, subprocess, sys
import torch
out, mode, status, seconds, command = sys.argv[1:6]
def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:
        return f"unavailable: {e}"
env = {"mode": mode, "command": command, "seconds": int(seconds), "steps": status.split(),
       "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
       "platform": platform.platform(), "cpus": __import__("os").cpu_count(),
       "nvcc": run(["nvcc", "--version"]).splitlines()[-1:] if shutil.which("nvcc") else None}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    env.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
               memory_gib=props.total_memory / 2**30,
               driver=run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem", "--format=csv,noheader"]))
json.dump(env, open(out, "w"), indent=2)
EOF
}

COMMAND="scripts/device_check.sh $*"
write_env "$COMMAND"

if [ -z "$CPU_FLAG" ]; then
  ARCH=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  rm -f gptq_cli/_C*.so
  run build 300 env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=16 GPTQ_BUILD_EXT=1 "$PY" setup.py build_ext --inplace
  rc=$?
  if [ $rc -eq 0 ]; then
    "$PY" -c 'from gptq_cli import kernels; assert kernels.backend_name("cuda") == "cuda-ext", "not loaded"' \
      >>"$LOGS/build.log" 2>&1 || rc=99
  fi
  log_json build $rc
  if [ $rc -ne 0 ]; then
    echo "build failed: stopping (see $OUTDIR/build.json)"
    write_env "$COMMAND"
    exit 1
  fi
  run tests 120 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_kernels.py tests/test_quant_linear.py \
    tests/test_gpu_path.py
  log_json tests $?
else
  run build 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_csrc_compile.py
  log_json build $?
  run tests 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gpu_path.py -k "not block"
  log_json tests $?
fi

# Each Python step writes OUTDIR/STEP.json itself; a step that fails leaves its exit code and log there instead.
run kernels 100 "$PY" scripts/device_check.py kernels "$OUTDIR" $CPU_FLAG || log_json kernels $?
run ppl 60 "$PY" scripts/device_check.py ppl "$OUTDIR" $CPU_FLAG || log_json ppl $?
BUDGET_Q=$(( $(left) - 15 ))
run quantize "$BUDGET_Q" "$PY" scripts/device_check.py quantize "$OUTDIR" $CPU_FLAG --budget "$BUDGET_Q" \
  || log_json quantize $?
write_env "$COMMAND"
echo "== done in $(( $(date +%s) - START ))s: $STATUS"
ls -la "$OUTDIR"
