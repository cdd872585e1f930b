#!/usr/bin/env bash
# Runs the published GPU check (see scripts/publish-gpu-check.sh) and keeps its logs.
# Usage: gpu-check.sh [--cpu-only] [--device N] [--runs N] [--seed N] [--no-private-context]
# Finds the app next to this script (inside the unpacked tarball) or in artifacts/gpu-check/QLora.GpuCheck (in a
# checkout); QLORA_GPU_CHECK=/path/to/QLora.GpuCheck overrides. Logs go to $OUT if set, else ./gpu-check-logs:
# gpu-check.log (everything), gpu-check.json (the final JSON line), nvidia-smi.txt. Exit code: the app's (0 = all checks passed).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ -n "${QLORA_GPU_CHECK:-}" ]; then app=$QLORA_GPU_CHECK
elif [ -x "$here/QLora.GpuCheck" ]; then app="$here/QLora.GpuCheck"
else app="$here/../artifacts/gpu-check/QLora.GpuCheck/QLora.GpuCheck"
fi
if [ ! -x "$app" ]; then
  echo "error: $app not found; run scripts/publish-gpu-check.sh first (or set QLORA_GPU_CHECK)" >&2
  exit 2
fi
logs=${OUT:-$PWD/gpu-check-logs}
mkdir -p "$logs"
{ date -u; uname -a; } > "$logs/host.txt" 2>&1
if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi > "$logs/nvidia-smi.txt" 2>&1; else echo "nvidia-smi not found" > "$logs/nvidia-smi.txt"; fi
"$app" "$@" 2>&1 | tee "$logs/gpu-check.log"
rc=${PIPESTATUS[0]}
tail -n 1 "$logs/gpu-check.log" > "$logs/gpu-check.json"
echo "exit code $rc; logs in $logs"
exit "$rc"
