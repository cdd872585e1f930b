#!/usr/bin/env bash
# Builds the GPU check bundle: everything a GPU machine with an NVIDIA driver and PyTorch (its CUDA libtorch), but no
# .NET and no network, needs to run scripts/gpu-check.sh. At most 64 MiB packed.
# Usage: scripts/publish-gpu-check.sh [output-dir]     (default: artifacts/gpu-check; RID=linux-x64 by default)
# Result: <output-dir>/qlora-gpu-check-<rid>.tar.gz holding qlora-gpu-check/:
#   app/          qlora (self-contained, -p:TorchBackend=external: TorchSharp and its shim, no libtorch) and
#                 QLora.GpuCheck (the kernel checks, no TorchSharp), published into one folder so they share one .NET runtime
#   gpu-check.sh  the script;  shim-symbols.py  the shim-vs-libtorch symbol check;  peer/lora_step.py  the PyTorch peer
#   quickstart/   the quick-start job (appsettings.json, models/tiny-llama-base, data/quickstart)
# Not trimmed: ILGPU reads the kernels' IL through reflection at run time.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$root/artifacts/gpu-check}" && cd "${1:-$root/artifacts/gpu-check}" && pwd)
rid=${RID:-linux-x64}
bundle="$out/qlora-gpu-check"
tarball="$out/qlora-gpu-check-$rid.tar.gz"
limit=$((64 * 1024 * 1024))
common=(-c Release -r "$rid" --self-contained true -p:DebugType=none -p:DebugSymbols=false -p:GenerateDocumentationFile=false)

rm -rf "$bundle" "$tarball"
mkdir -p "$bundle/app" "$bundle/peer" "$bundle/quickstart/models" "$bundle/quickstart/data"
dotnet publish "$root/src/Cli/QLora.Cli.csproj" "${common[@]}" -p:TorchBackend=external -o "$bundle/app"
dotnet publish "$root/bench/GpuCheck/QLora.GpuCheck.csproj" "${common[@]}" -o "$bundle/app"
# The next plain build of src/Cli must restore its default (CPU libtorch) packages again: the external restore replaced them.
rm -f "$bundle/app"/*.xml "$bundle/app"/*.pdb
if ls "$bundle/app" | grep -Eq '^(lib)?(torch|torch_cpu|torch_cuda|c10|c10_cuda)\.(so|dll)$'; then
  echo "error: the external-libtorch publish contains libtorch files" >&2
  exit 1
fi
cp "$root/scripts/gpu-check.sh" "$root/scripts/shim-symbols.py" "$bundle/"
cp "$root/bench/peer/lora_step.py" "$bundle/peer/"
cp "$root/appsettings.json" "$bundle/quickstart/"
cp -r "$root/models/tiny-llama-base" "$bundle/quickstart/models/"
cp -r "$root/data/quickstart" "$bundle/quickstart/data/"
chmod +x "$bundle/gpu-check.sh" "$bundle/shim-symbols.py" "$bundle/app/qlora" "$bundle/app/QLora.GpuCheck"
tar -C "$out" -czf "$tarball" qlora-gpu-check
size=$(stat -c %s "$tarball")
echo "published $bundle ($(du -sm "$bundle" | cut -f1) MiB unpacked)"
echo "packed $tarball: $((size / 1024 / 1024)) MiB ($size bytes)"
if [ "$size" -gt "$limit" ]; then
  echo "error: $tarball is larger than 64 MiB" >&2
  exit 1
fi
