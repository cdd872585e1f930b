using System.Runtime.InteropServices;

namespace QLora.Kernels;

/// <summary>
/// Sixteen bytes moved as one unit, so a kernel reads packed codes and writes outputs with 128-bit memory operations.
/// Views of this type need 16-byte aligned addresses.
/// </summary>
[StructLayout(LayoutKind.Sequential, Size = 16)]
public struct Packed16
{
    /// <summary>Bytes 0–3 (little-endian).</summary>
    public uint X;
    /// <summary>Bytes 4–7.</summary>
    public uint Y;
    /// <summary>Bytes 8–11.</summary>
    public uint Z;
    /// <summary>Bytes 12–15.</summary>
    public uint W;

    /// <summary>Creates a value from four little-endian words.</summary>
    public Packed16(uint x, uint y, uint z, uint w)
    {
        X = x;
        Y = y;
        Z = z;
        W = w;
    }
}
