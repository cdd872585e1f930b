using System.Runtime.InteropServices;

namespace QLora.Trainer;

/// <summary>
/// Resident layers on the CPU backend: one aligned anonymous block per resident layer, written in place and freed when
/// the layer leaves, so device memory (resident anonymous memory) holds only the resident layers.
/// </summary>
internal sealed unsafe class HostLayerBuffers : ILayerBuffers
{
    /// <inheritdoc />
    public nint Rent(long bytes) => (nint)NativeMemory.AlignedAlloc((nuint)Math.Max(bytes, 1), 64);

    /// <inheritdoc />
    public void Fill(nint buffer, long bytes, Action<nint> write) => write(buffer);

    /// <inheritdoc />
    public void Return(nint buffer) => NativeMemory.AlignedFree((void*)buffer);

    /// <inheritdoc />
    public void Dispose() { }
}
