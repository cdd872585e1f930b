#!/usr/bin/env bash
# The GPU check: the one script a GPU machine runs (docs/perf.md, "GPU check", says what each step checks and its
# targets). Runs the real trainer (qlora, published self-contained with -p:TorchBackend=external by
# scripts/publish-gpu-check.sh) on the machine's PyTorch libtorch, the kernel checks, and a PyTorch peer of the same
# LoRA step, within about 8 minutes; prints a table and JSON lines, and keeps every log in one folder.
#
# Usage: gpu-check.sh [--cpu-only] [--logs DIR] [--libtorch DIR] [--device N] [--train-layers N] [--stream-layers N]
#                     [--time-limit SECONDS]
#   --cpu-only        no GPU: steps that need CUDA are reported as skipped (with the reason); the CPU variants of the
#                     small checks run (a smoke test of the bundle; the targets apply to the GPU run)
#   --logs DIR        where the logs go (default: $OUT if set, else ./gpu-check-logs)
#   --libtorch DIR    libtorch lib folder (default: $QLORA_LIBTORCH, else python3's torch: <torch>/lib)
#   --device N        CUDA device ordinal (default 0)
#   --train-layers N  decoder layers of the Llama-3.1-8B-shaped bench train and peer (default 16 of 32)
#   --stream-layers N decoder layers of the streamed llama-3.1-70b memory step (default 4 of 80)
#   --time-limit S    overall budget in seconds (default 470, --cpu-only 290); a step that would start after it is skipped
#   --cpu-eval-loss X the CPU run's final quick-start eval loss to compare with (default 0.066, README's figure)
# Logs: host.txt, nvidia-smi.txt, one <step>.log each, results.jsonl (one JSON line per step), summary.json.
# Exit code: 0 when no step failed (skips do not fail).
set -uo pipefail
start_s=$(date +%s)
here=$(cd "$(dirname "$0")" && pwd)
if [ -x "$here/app/qlora" ]; then  # inside the unpacked bundle
  bundle=$here
else                               # in a checkout: the bundle built by scripts/publish-gpu-check.sh
  bundle=$(cd "$here/.." && pwd)/artifacts/gpu-check/qlora-gpu-check
fi
app=$bundle/app

cpu_only=0 logs=${OUT:-$PWD/gpu-check-logs} libtorch=${QLORA_LIBTORCH:-} ordinal=0 train_layers=16 stream_layers=4 limit=""
cpu_eval_loss=0.066
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-only) cpu_only=1 ;;
    --logs) logs=$2; shift ;;
    --libtorch) libtorch=$2; shift ;;
    --device) ordinal=$2; shift ;;
    --train-layers) train_layers=$2; shift ;;
    --stream-layers) stream_layers=$2; shift ;;
    --time-limit) limit=$2; shift ;;
    --cpu-eval-loss) cpu_eval_loss=$2; shift ;;
    -h|--help) sed -n 2,22p "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$limit" ] || limit=$([ $cpu_only = 1 ] && echo 290 || echo 470)
if ! command -v python3 >/dev/null 2>&1; then
  echo "gpu-check: python3 is needed (to find PyTorch and read JSON); none on PATH" >&2; exit 2
fi
if [ ! -x "$app/qlora" ]; then
  echo "gpu-check: $app/qlora not found; run scripts/publish-gpu-check.sh first" >&2; exit 2
fi
mkdir -p "$logs" && logs=$(cd "$logs" && pwd)
results=$logs/results.jsonl
: > "$results"
mode=$([ $cpu_only = 1 ] && echo cpu-only || echo gpu)
cuda=cuda:$ordinal
export DOTNET_gcServer=0

# --- helpers ---------------------------------------------------------------------------------------------------------
elapsed() { echo $(( $(date +%s) - start_s )); }
left() { echo $(( limit - $(elapsed) )); }

# record <check> <pass|fail|skip|info> <seconds> <detail> [json object of figures]
record() {
  CHECK=$1 STATUS=$2 SECS=$3 DETAIL=$4 FIGURES=${5:-"{}"} python3 - >> "$results" <<'PY'
import json, os
try:
    figures = json.loads(os.environ["FIGURES"] or "{}")
except ValueError:
    figures = {"unparsed": os.environ["FIGURES"]}
print(json.dumps({"check": os.environ["CHECK"], "status": os.environ["STATUS"], "seconds": int(os.environ["SECS"]),
                  "detail": os.environ["DETAIL"], **({"figures": figures} if figures else {})}))
PY
  tail -n 1 "$results"
}

# last_json <log>: the log's last line that parses as a JSON object (empty when none)
last_json() {
  python3 - "$1" <<'PY'
import json, sys
found = ""
try:
    for line in open(sys.argv[1], encoding="utf-8", errors="replace"):
        line = line.strip()
        if line.startswith("{"):
            try:
                json.loads(line); found = line
            except ValueError:
                pass
except OSError:
    pass
print(found)
PY
}

# js <json> <python expression over j>: evaluates, prints the result ('' on any error)
js() { J=$1 python3 -c "import json,os,sys
try:
    j=json.loads(os.environ['J']); r=$2
    print('' if r is None else (json.dumps(r) if isinstance(r,(dict,list,bool)) else r))
except Exception: print('')"; }

# run_step <name> <cap seconds> <command...>: runs with a timeout (the smaller of cap and what is left), logs to <name>.log
run_step() {
  local name=$1 cap=$2; shift 2
  local budget; budget=$(left)
  step_trimmed=0 step_s=0
  if [ "$budget" -lt "$cap" ]; then cap=$budget step_trimmed=1; fi
  if [ "$cap" -le 10 ]; then step_rc=125; echo "time budget spent" > "$logs/$name.log"; return; fi
  echo "== $name: $*" | tee "$logs/$name.log" >/dev/null
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$cap" "$@" >> "$logs/$name.log" 2>&1
  step_rc=$?
  step_s=$(( $(date +%s) - t0 ))
  [ $step_rc = 124 ] || [ $step_rc = 137 ] && echo "== timed out after $cap s" >> "$logs/$name.log"
}
step_s=0 step_rc=0 step_trimmed=0
why_failed() { tail -n 3 "$logs/$1.log" | tr '\n' ' ' | cut -c1-400; }
# not_finished <check> <what>: a step without its JSON line: skipped when the overall time budget stopped it, else failed
not_finished() {
  if [ "$step_trimmed" = 1 ] && { [ "$step_rc" = 124 ] || [ "$step_rc" = 137 ] || [ "$step_rc" = 125 ]; }; then
    record "$1" skip "$step_s" "the overall time budget ($limit s) ran out: $2 stopped after $step_s s" >/dev/null
  else
    record "$1" fail "$step_s" "$2 did not finish (exit $step_rc): $(why_failed "$1")" >/dev/null
  fi
}
supports() { local opt=$1; shift; "$app/qlora" "$@" --help 2>/dev/null | grep -q -- "$opt"; }

echo "QLora.NET GPU check ($mode), logs in $logs"

# --- 0. host -----------------------------------------------------------------------------------------------------------
{ date -u; uname -a; echo "bundle: $bundle"; echo "mode: $mode"; cat /etc/os-release 2>/dev/null | head -2; } > "$logs/host.txt" 2>&1
if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi > "$logs/nvidia-smi.txt" 2>&1; else echo "nvidia-smi not found" > "$logs/nvidia-smi.txt"; fi
timeout 90 python3 - > "$logs/pytorch.json" 2>> "$logs/host.txt" <<'PY'
import json
info = {}
try:
    import os, torch
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "lib": os.path.join(os.path.dirname(torch.__file__), "lib"),
            "cuda_available": torch.cuda.is_available()}
    if info["cuda_available"]:
        info["device"] = torch.cuda.get_device_name(0)
except Exception as e:
    info = {"error": f"{type(e).__name__}: {e}"}
print(json.dumps(info))
PY
pytorch=$(cat "$logs/pytorch.json" 2>/dev/null); [ -n "$pytorch" ] || pytorch='{"error":"python3 probe timed out"}'
record host info 0 "$(uname -sr); $(head -c 300 "$logs/nvidia-smi.txt" | grep -m1 -o 'Driver Version: [0-9.]*' || echo 'no nvidia-smi output'); python3 torch: $(js "$pytorch" "j.get('torch') or j.get('error')")" "$pytorch" >/dev/null

# --- 1. libtorch: which one, which version ----------------------------------------------------------------------------
torch_ok=1 torch_why=""
if [ -z "$libtorch" ]; then libtorch=$(js "$pytorch" "j.get('lib')"); fi
if [ -z "$libtorch" ] && [ $cpu_only = 1 ]; then  # a build machine: the NuGet cache's CPU libtorch (never the app's own)
  libtorch=$(ls -d "${NUGET_PACKAGES:-$HOME/.nuget/packages}"/libtorch-cpu-linux-x64/*/runtimes/linux-x64/native 2>/dev/null | sort -V | tail -n 1)
fi
if [ -z "$libtorch" ] || [ ! -f "$libtorch/libtorch_cpu.so" ]; then
  torch_ok=0 torch_why="no libtorch found (pass --libtorch <.../torch/lib>, set QLORA_LIBTORCH, or install PyTorch for python3)"
  record libtorch fail 0 "$torch_why" >/dev/null
else
  version=$(python3 - "$libtorch" <<'PY'
import re, sys, os
d = os.path.dirname(os.path.abspath(sys.argv[1]))
for f in ("version.py", "build-version"):
    p = os.path.join(d, f)
    if os.path.exists(p):
        t = open(p).read()
        m = re.search(r"__version__\s*(?::\s*\w+\s*)?=\s*['\"]([^'\"]+)", t) if f == "version.py" else re.match(r"\s*(\S+)", t)
        if m: print(m.group(1)); break
else:
    m = re.search(r"libtorch-[^/]+/([0-9][^/]*)/runtimes", os.path.abspath(sys.argv[1]))
    print(m.group(1) if m else "")
PY
)
  cuda_libs=$([ -f "$libtorch/libtorch_cuda.so" ] && echo true || echo false)
  detail="$libtorch: version ${version:-unknown}, CUDA libraries $cuda_libs"
  case "$version" in
    2.10|2.10.*) ;;
    *) export QLORA_LIBTORCH_ALLOW_MISMATCH=1
       detail="$detail; differs from the shim's 2.10: QLORA_LIBTORCH_ALLOW_MISMATCH=1, so qlora runs only after its CPU/CUDA self-check" ;;
  esac
  record libtorch info 0 "$detail" "{\"dir\":\"$libtorch\",\"version\":\"$version\",\"cuda_libraries\":$cuda_libs}" >/dev/null
  export QLORA_LIBTORCH=$libtorch
fi

# --- 2. the shim against this libtorch (first: if it cannot run, say exactly why) -------------------------------------
if [ $torch_ok = 1 ]; then
  run_step shim-symbols 120 python3 "$bundle/shim-symbols.py" "$app/libLibTorchSharp.so" "$libtorch"
  j=$(last_json "$logs/shim-symbols.log")
  if [ "$(js "$j" "j['ok']")" = "true" ]; then
    record shim-symbols pass "$step_s" "all $(js "$j" "j['needed']") symbols libLibTorchSharp.so needs are defined by $libtorch or the C/C++ runtime" "$j" >/dev/null
  elif [ -n "$j" ]; then
    torch_ok=0 torch_why="TorchSharp's shim will not run against $libtorch: $(js "$j" "j['missing_count']") symbols it needs are missing (first: $(js "$j" "', '.join(j['missing'][:5])"); full list in shim-symbols.log)"
    record shim-symbols fail "$step_s" "$torch_why" "$j" >/dev/null
    echo "!! $torch_why"
  else
    record shim-symbols fail "$step_s" "the symbol check did not run: $(why_failed shim-symbols)" >/dev/null
  fi
fi
skip_torch() { record "$1" skip 0 "needs TorchSharp on this libtorch: $torch_why" >/dev/null; }

# --- 3. qlora doctor (LD_BIND_NOW=1: a missing function fails the load, by name, instead of killing a later call) ------
run_step doctor 90 env LD_BIND_NOW=1 "$app/qlora" doctor
j=$(last_json "$logs/doctor.log")
if [ -z "$j" ]; then
  not_finished doctor "qlora doctor"
  [ $torch_ok = 1 ] && torch_ok=0 torch_why="qlora doctor failed on this libtorch (doctor.log)"
else
  healthy=$(js "$j" "j['healthy']")
  devices=$(js "$j" "'; '.join(f\"{d['name']} {d['memory_bytes']/2**30:.0f} GiB cc {d['compute_capability']} ({d['ptx']})\" for d in j['devices']) or 'no CUDA device'")
  detail="libtorch $(js "$j" "j['libtorch']['version']") from $(js "$j" "j['libtorch']['directory']"); CUDA available: $(js "$j" "j['cuda_available']"); $devices; self-check $(js "$j" "'ok' if all(c['passed'] for c in j['self_check']) and j['self_check'] else 'FAILED'")"
  if [ "$healthy" = "true" ]; then record doctor pass "$step_s" "$detail" "$j" >/dev/null
  else
    record doctor fail "$step_s" "$detail; errors: $(js "$j" "'; '.join(f['what'] for f in j['findings'] if f['error'])")" "$j" >/dev/null
    [ $torch_ok = 1 ] && torch_ok=0 torch_why="qlora doctor: $(js "$j" "'; '.join(f['what'] for f in j['findings'] if f['error'])")"
  fi
  cuda_available=$(js "$j" "j['cuda_available']")
fi
gpu_ok=1 gpu_why=""
if [ $cpu_only = 1 ]; then gpu_ok=0 gpu_why="--cpu-only"
elif [ "${cuda_available:-}" != "true" ]; then gpu_ok=0 gpu_why="torch does not see CUDA here (doctor.log)"
fi

# --- 4. the kernels (no TorchSharp): bit-identical to the CPU path, bandwidth over a device copy -------------------------
kernel_args=(--device "$ordinal"); [ $cpu_only = 1 ] && kernel_args+=(--cpu-only)
run_step kernels 120 "$app/QLora.GpuCheck" "${kernel_args[@]}"
j=$(last_json "$logs/kernels.log")
if [ -z "$j" ]; then not_finished kernels "QLora.GpuCheck"
else
  ratios=$(js "$j" "', '.join(f\"{k} ratio {v['ratio']}\" for k, v in j.items() if isinstance(v, dict) and 'ratio' in v) or 'no bandwidth figures'")
  what="$(js "$j" "sum(1 for c in j['checks'].values() if c.startswith('pass'))") checks passed, $(js "$j" "sum(1 for c in j['checks'].values() if c.startswith('fail'))") failed, $(js "$j" "sum(1 for c in j['checks'].values() if c.startswith('skip'))") skipped; $ratios (target >= 0.80)"
  record kernels "$([ "$(js "$j" "j['passed']")" = true ] && echo pass || echo fail)" "$step_s" "$what" "$j" >/dev/null
fi

# --- 5. the quick-start job on cuda: exact match >= 0.9, eval loss within 3 % of the CPU run's --------------------------
# cpu_eval_loss: the CPU run's final eval loss as README records it (0.065951, 2026-12-01; CPU runs repeat it bit for bit)
if [ $torch_ok = 0 ]; then skip_torch quickstart
else
  qs_args=(--Output:Dir "$logs/quickstart")
  if [ $gpu_ok = 1 ]; then qs_args+=(--Model:Device "$cuda")
  else qs_args+=(--Training:MaxSteps 4 --Eval:EveryNSteps 4 --Eval:ExactMatchSamples 20 --Output:SaveEveryNSteps 4); fi  # CPU smoke: a short run
  ( cd "$bundle/quickstart" 2>/dev/null || cd "$here/.."; run_step quickstart "$([ $gpu_ok = 1 ] && echo 150 || echo 120)" "$app/qlora" train "${qs_args[@]}"
    echo "$step_rc $step_s $step_trimmed" > "$logs/.quickstart.rc" )
  read -r step_rc step_s step_trimmed < "$logs/.quickstart.rc"; rm -f "$logs/.quickstart.rc"
  j=$(last_json "$logs/quickstart.log")
  em=$(js "$j" "j['exact_match_after']"); loss=$(js "$j" "j['eval_loss']")
  if [ -z "$j" ] || [ -z "$loss" ]; then not_finished quickstart "qlora train"
  elif [ $gpu_ok = 1 ]; then
    ok=$(js "$j" "j['exact_match_after'] >= 0.9 and abs(j['eval_loss'] - $cpu_eval_loss) <= 0.03 * $cpu_eval_loss")
    record quickstart "$([ "$ok" = true ] && echo pass || echo fail)" "$step_s" "on $cuda: exact match $em (target >= 0.9), eval loss $loss vs the CPU's $cpu_eval_loss (target within 3 %), $(js "$j" "j['tokens_per_s']") tokens/s" "$j" >/dev/null
  else
    record quickstart info "$step_s" "CPU smoke, 4 steps, exact match on 20 samples: eval loss $loss, exact match $em ($gpu_why: the targets apply to the full job on cuda)" "$j" >/dev/null
  fi
fi

# --- 6. bench train on a Llama-3.1-8B shape: MFU >= 0.40, dequant overhead <= 1.10 --------------------------------------
shape8b=(--hidden 4096 --intermediate 14336 --heads 32 --kv-heads 8 --vocab 128256)
ours_tps=""
if [ $torch_ok = 0 ]; then skip_torch bench-train
elif [ $gpu_ok = 1 ]; then
  if ! supports --device bench train; then record bench-train fail 0 "this qlora's bench train has no --device option: the device half of issue 11 is not in this build" >/dev/null
  else
    run_step bench-train 180 "$app/qlora" bench train --device "$cuda" --layers "$train_layers" "${shape8b[@]}" --seq 2048 --batch 1 --rank 16 --steps 3
    j=$(last_json "$logs/bench-train.log"); ours_tps=$(js "$j" "j['tokens_per_s']")
    if [ -z "$ours_tps" ]; then not_finished bench-train "bench train"
    else
      ok=$(js "$j" "j['mfu'] >= 0.40 and j['dequant_overhead'] <= 1.10")
      record bench-train "$([ "$ok" = true ] && echo pass || echo fail)" "$step_s" "Llama-3.1-8B shape, $train_layers of 32 layers, seq 2048: $ours_tps tokens/s, MFU $(js "$j" "j['mfu']") (target >= 0.40) against $(js "$j" "j['matmul_gflops']") GFLOP/s bf16 matmul, dequant overhead $(js "$j" "j['dequant_overhead']") (target <= 1.10)" "$j" >/dev/null
    fi
  fi
else
  small=(--layers 2 --hidden 256 --intermediate 688 --heads 8 --kv-heads 2 --vocab 1024 --seq 128 --batch 1 --rank 16 --steps 2)
  run_step bench-train 90 "$app/qlora" bench train "${small[@]}"
  j=$(last_json "$logs/bench-train.log"); ours_tps=$(js "$j" "j['tokens_per_s']")
  if [ -z "$ours_tps" ]; then not_finished bench-train "bench train"
  else record bench-train info "$step_s" "CPU smoke, tiny shape (2 layers, hidden 256, seq 128): $ours_tps tokens/s, MFU $(js "$j" "j['mfu']"), overhead $(js "$j" "j['dequant_overhead']") ($gpu_why: the 8B shape and targets need cuda)" "$j" >/dev/null; fi
fi

# --- 7. the PyTorch peer: the same LoRA step in transformers + peft; ours / PyTorch tokens/s >= 0.9 ---------------------
python3 -m py_compile "$bundle/peer/lora_step.py" 2> "$logs/peer-compile.log" || record peer fail 0 "peer/lora_step.py does not compile: $(cat "$logs/peer-compile.log" | tail -n 1)" >/dev/null
if [ $gpu_ok = 1 ]; then
  run_step peer 150 python3 "$bundle/peer/lora_step.py" --device "$cuda" --layers "$train_layers" --seq 2048 --batch 1 --rank 16 --alpha 32 --steps 3
else
  run_step peer 90 python3 "$bundle/peer/lora_step.py" --device cpu --layers 2 --hidden 256 --intermediate 688 --heads 8 --kv-heads 2 --vocab 1024 --seq 128 --batch 1 --rank 16 --alpha 32 --steps 2
fi
j=$(last_json "$logs/peer.log"); peer_tps=$(js "$j" "j.get('tokens_per_s')")
if [ "$(js "$j" "j.get('status')")" = skip ]; then record peer skip "$step_s" "$(js "$j" "j['reason']") (the script compiles)" "$j" >/dev/null
elif [ -z "$peer_tps" ]; then not_finished peer "the peer"
elif [ -z "$ours_tps" ]; then record peer info "$step_s" "PyTorch $(js "$j" "j['torch']"): $peer_tps tokens/s; no qlora figure to compare" "$j" >/dev/null
else
  ratio=$(python3 -c "print(round($ours_tps / $peer_tps, 3))")
  if [ $gpu_ok = 1 ]; then
    record peer "$(python3 -c "print('pass' if $ratio >= 0.9 else 'fail')")" "$step_s" "PyTorch $(js "$j" "j['torch']") + peft $(js "$j" "j['peft']"): $peer_tps tokens/s; ours / PyTorch = $ratio (target >= 0.9)" "$(js "$j" "{**j, 'ratio': $ratio}")" >/dev/null
  else
    record peer info "$step_s" "CPU smoke: PyTorch $(js "$j" "j['torch']") $peer_tps tokens/s; ours / PyTorch = $ratio (informative only)" "$(js "$j" "{**j, 'ratio': $ratio}")" >/dev/null
  fi
fi

# --- 8. bench memory with a 24 GB card emulated: measured peak within +-10 % of the plan --------------------------------
memory_step() {  # memory_step <name> <cap> <description> <args...>
  local name=$1 cap=$2 what=$3; shift 3
  run_step "$name" "$cap" "$app/qlora" bench memory "$@"
  local j; j=$(last_json "$logs/$name.log")
  local r; r=$(js "$j" "j['measured_over_planned']")
  if [ -z "$r" ]; then not_finished "$name" "bench memory"; return; fi
  local figures="peak $(js "$j" "round(j['measured_peak_bytes']/1e9, 2)") GB, planned $(js "$j" "round(j['planned_peak_bytes']/1e9, 2)") GB, measured/planned $r, step $(js "$j" "j['step_s']") s"
  if [ $gpu_ok = 1 ]; then
    record "$name" "$(python3 -c "print('pass' if abs($r - 1) <= 0.10 else 'fail')")" "$step_s" "$what: $figures (target within +-10 %)" "$j" >/dev/null
  else
    record "$name" info "$step_s" "$what, CPU smoke: $figures ($gpu_why: the 24 GB emulation and the target need cuda)" "$j" >/dev/null
  fi
}
scratch=$logs/scratch-70b
if [ $torch_ok = 0 ]; then skip_torch memory-8b; skip_torch memory-70b-stream
elif [ $gpu_ok = 1 ]; then
  if ! supports --emulate-vram bench memory; then
    record memory-8b fail 0 "this qlora's bench memory has no --device/--emulate-vram: the device half of issue 11 is not in this build" >/dev/null
  else
    memory_step memory-8b 120 "llama-3.1-8b, seq 2048, 24 GB emulated on $cuda" --device "$cuda" --emulate-vram 24GB --preset llama-3.1-8b --seq 2048
    memory_step memory-70b-stream 150 "llama-3.1-70b streamed, $stream_layers of 80 layers, seq 2048, 24 GB emulated" \
      --device "$cuda" --emulate-vram 24GB --preset llama-3.1-70b --stream --layers "$stream_layers" --seq 2048 --scratch "$scratch"
  fi
else
  memory_step memory-8b 90 "llama-3.1-8b shape, 1 layer, vocab 1024, seq 64 on the CPU" --preset llama-3.1-8b --layers 1 --vocab 1024 --seq 64
  memory_step memory-70b-stream 120 "llama-3.1-70b shape streamed, 1 layer, vocab 1024, seq 32 on the CPU" \
    --preset llama-3.1-70b --stream --layers 1 --vocab 1024 --seq 32 --scratch "$scratch"
fi
rm -rf "$scratch"  # the streamed checkpoint this script had written (several GB); the logs stay

# --- 10. NCCL: a 1-rank all-reduce through the communicator data-parallel CUDA ranks use (one GPU cannot test more) ----
if [ $torch_ok = 0 ]; then skip_torch nccl
elif [ $gpu_ok = 0 ]; then record nccl skip 0 "needs cuda ($gpu_why); data-parallel CPU ranks sum over MPI (tests)" >/dev/null
elif ! supports nccl bench; then record nccl fail 0 "this qlora has no bench nccl: the NCCL half of the data-parallel issue is not in this build" >/dev/null
else
  run_step nccl 90 "$app/qlora" bench nccl --device "$cuda" --mib 160 --runs 20
  j=$(last_json "$logs/nccl.log")
  if [ -n "$j" ]; then
    record nccl "$([ "$(js "$j" "j['exact']")" = true ] && echo pass || echo fail)" "$step_s" "$(js "$j" "j['nccl']") ($(js "$j" "j['nccl_library']")), 1 rank on $cuda: 160 MiB float32 all-reduce $(js "$j" "round(j['allreduce_s'] * 1e3, 2)") ms, algbw $(js "$j" "j['algbw_gbps']") GB/s, sum $(js "$j" "'exact' if j['exact'] else 'WRONG'") (one GPU: no inter-GPU bandwidth to measure)" "$j" >/dev/null
  elif grep -q "NCCL cannot be used" "$logs/nccl.log"; then
    record nccl skip "$step_s" "no NCCL found: $(grep -m1 "NCCL cannot be used" "$logs/nccl.log" | sed 's/.*NCCL cannot be used: //') (CUDA ranks then sum through host memory over MPI)" >/dev/null
  else not_finished nccl "bench nccl"; fi
fi

# --- table and summary --------------------------------------------------------------------------------------------------
LOGS=$logs MODE=$mode TOTAL=$(elapsed) python3 - "$results" <<'PY' | tee "$logs/table.txt"
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print()
print(f"{'check':<18} {'status':<6} {'s':>4}  detail")
for r in rows:
    print(f"{r['check']:<18} {r['status']:<6} {r['seconds']:>4}  {r['detail']}")
counts = {s: sum(1 for r in rows if r["status"] == s) for s in ("pass", "fail", "skip", "info")}
summary = {"gpu_check": os.environ["MODE"], "total_s": int(os.environ["TOTAL"]), **counts, "ok": counts["fail"] == 0,
           "logs": os.environ["LOGS"], "checks": {r["check"]: r["status"] for r in rows}}
print()
with open(os.path.join(os.environ["LOGS"], "summary.json"), "w") as f:
    f.write(json.dumps(summary) + "\n")
PY
echo "== results (one JSON line per check; also in $results)"
cat "$results"
cat "$logs/summary.json"
[ "$(js "$(cat "$logs/summary.json")" "j['ok']")" = true ]
