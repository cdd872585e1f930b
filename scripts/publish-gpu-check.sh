#!/usr/bin/env bash
# Publishes bench/GpuCheck as a self-contained app (no .NET SDK or runtime needed on the GPU machine) and packs it.
# Usage: scripts/publish-gpu-check.sh [output-dir]     (default: artifacts/gpu-check; RID=linux-x64 by default)
# Result: <output-dir>/qlora-gpu-check-<rid>.tar.gz (≤ 64 MiB), holding QLora.GpuCheck/ with the app and gpu-check.sh.
# Not trimmed: ILGPU reads the kernels' IL through reflection at run time.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$root/artifacts/gpu-check}" && cd "${1:-$root/artifacts/gpu-check}" && pwd)
rid=${RID:-linux-x64}
app="$out/QLora.GpuCheck"
tarball="$out/qlora-gpu-check-$rid.tar.gz"
limit=$((64 * 1024 * 1024))

rm -rf "$app" "$tarball"
dotnet publish "$root/bench/GpuCheck/QLora.GpuCheck.csproj" -c Release -r "$rid" --self-contained true \
  -p:DebugType=none -p:DebugSymbols=false -p:GenerateDocumentationFile=false -o "$app"
rm -f "$app"/*.xml "$app"/*.pdb
cp "$root/scripts/gpu-check.sh" "$app/gpu-check.sh"
chmod +x "$app/gpu-check.sh" "$app/QLora.GpuCheck" 2>/dev/null || true
tar -C "$out" -czf "$tarball" QLora.GpuCheck
size=$(stat -c %s "$tarball")
echo "published $app"
echo "packed $tarball: $((size / 1024 / 1024)) MiB ($size bytes)"
if [ "$size" -gt "$limit" ]; then
  echo "error: $tarball is larger than 64 MiB" >&2
  exit 1
fi
