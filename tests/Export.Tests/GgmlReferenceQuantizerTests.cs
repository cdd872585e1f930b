using System.Runtime.InteropServices;
using QLora.Quant.Gguf;
using Xunit.Abstractions;

namespace QLora.Export.Tests;

/// <summary>
/// qlora's block quantizers against ggml's own <c>quantize_row_*_ref</c>, called in the libggml-base that LLamaSharp
/// loaded: the bytes must be identical for random rows (Gaussian-like weights with outliers, and an all-zero block).
/// </summary>
public sealed unsafe class GgmlReferenceQuantizerTests(ITestOutputHelper output)
{
    [Theory]
    [InlineData(GgmlType.Q8_0, "quantize_row_q8_0_ref")]
    [InlineData(GgmlType.Q4_0, "quantize_row_q4_0_ref")]
    [InlineData(GgmlType.Q5_0, "quantize_row_q5_0_ref")]
    [InlineData(GgmlType.Q4_K, "quantize_row_q4_K_ref")]
    [InlineData(GgmlType.Q5_K, "quantize_row_q5_K_ref")]
    [InlineData(GgmlType.Q6_K, "quantize_row_q6_K_ref")]
    public void Bytes_equal_ggmls_reference_quantizer(GgmlType type, string function)
    {
        var quantize = (delegate* unmanaged<float*, byte*, long, void>)NativeLibrary.GetExport(GgmlBase(), function);
        const int columns = 1024, rows = 16;
        var rng = new Random(11);
        var x = new float[columns * rows];
        for (int i = 0; i < x.Length; i++)
        {
            double u = rng.NextDouble() + rng.NextDouble() + rng.NextDouble() - 1.5;
            x[i] = (float)(u * 0.03 * (1 + i / columns % 4) * (rng.Next(40) == 0 ? 8 : 1));
        }
        Array.Clear(x, 0, 256); // an all-zero block takes its own path
        var ours = new byte[type.RowBytes(columns) * rows];
        var theirs = new byte[ours.Length];
        GgmlQuantizer.Quantize(type, x, columns, ours);
        fixed (float* px = x)
        fixed (byte* py = theirs)
            quantize(px, py, x.Length);
        int blocks = ours.Length / type.BlockBytes(), differing = 0;
        for (int b = 0; b < blocks; b++)
            if (!ours.AsSpan(b * type.BlockBytes(), type.BlockBytes()).SequenceEqual(theirs.AsSpan(b * type.BlockBytes(), type.BlockBytes()))) differing++;
        output.WriteLine($"{type.Name()}: {differing} of {blocks} blocks differ from ggml's {function}");
        Assert.Equal(0, differing);
    }

    // The libggml-base LLamaSharp chose for this CPU (avx512, avx2, ...), found in the process's own mappings.
    private static nint GgmlBase()
    {
        LlamaCpp.EnsureLoaded();
        var path = File.ReadLines("/proc/self/maps").Select(l => l.Split(' ', StringSplitOptions.RemoveEmptyEntries))
            .Where(f => f.Length >= 6 && f[5].EndsWith("/libggml-base.so", StringComparison.Ordinal)).Select(f => f[5]).FirstOrDefault()
            ?? throw new InvalidOperationException("LLamaSharp did not load libggml-base.so");
        return NativeLibrary.Load(path);
    }
}
