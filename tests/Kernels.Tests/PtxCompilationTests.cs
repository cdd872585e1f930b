using System.Text.RegularExpressions;
using ILGPU.Runtime.Cuda;
using QLora.Quant;

namespace QLora.Kernels.Tests;

/// CI's check that every kernel compiles to PTX on a machine without a GPU, with the entry name and parameter list the
/// driver launcher relies on.
public class PtxCompilationTests
{
    public static TheoryData<string> Kernels() => new(KernelCatalog.Names);

    private static readonly Dictionary<string, int> ParamSizes = new() { [".b32"] = 4, [".f32"] = 4, [".b64"] = 8, ["view"] = 16 };

    /// Byte sizes of the entry's parameters: .b32/.f32 = 4, .b64 = 8, an ArrayView (.align 8 .b8 name[16]) = 16.
    private static List<int> EntryParameterSizes(string ptx)
    {
        var list = PtxKernelCompiler.ParameterTypes(ptx);
        return list.Select(p => Regex.IsMatch(p, @"^\.align 8 \.b8 \S+\[16\]$") ? 16 : ParamSizes[p.Split(' ')[0]]).ToList();
    }

    [Fact]
    public void CatalogHasEveryKernel()
    {
        Assert.Equal(
            ["AdamW8bitUpdate", "AdamW8bitUpdateBf16", "DequantizeBf16", "DequantizeF16", "DequantizeF32", "DequantizeNestedBf16", "DequantizeNestedF16", "DequantizeNestedF32"],
            KernelCatalog.Names);
    }

    [Theory]
    [MemberData(nameof(Kernels))]
    public void CompilesWithExpectedEntryAndTarget(string name)
    {
        var k = PtxKernelCompiler.Shared.Compile(name, CudaArchitecture.SM_80, CudaInstructionSet.ISA_70);
        Assert.Equal("Kernel_" + name, k.EntryName);
        Assert.Contains(".visible .entry Kernel_" + name + "(", k.Assembly);
        Assert.Contains(".target sm_80", k.Assembly);
        Assert.Contains(".version 7.0", k.Assembly);
        Assert.Contains(".address_size 64", k.Assembly);
        // No float32 add/sub/mul the JIT could fuse into an FMA (bit-identity with the C# references).
        Assert.DoesNotMatch(@"\b(add|sub|mul)(\.ftz)?\.f32\b", k.Assembly);
        Assert.DoesNotMatch(@"\bfma\.", k.Assembly);
        Assert.DoesNotContain(".approx", k.Assembly);
        // ILGPU widens a ushort with a sign extension; kernels must keep 16-bit results in uint (see HalfBits).
        Assert.DoesNotMatch(@"\bcvt\.s(32|64)\.s16\b", k.Assembly);
        Assert.Same(k, PtxKernelCompiler.Shared.Compile(name, CudaArchitecture.SM_80, CudaInstructionSet.ISA_70)); // cached
    }

    [Fact]
    public void CompilesForHopperWithItsIsa()
    {
        Assert.True(CudaAccelerator.TryGetInstructionSet(CudaArchitecture.SM_90, CudaDriverVersion.FromMajorMinor(12, 4), out _, out var isa));
        Assert.Equal(CudaInstructionSet.ISA_84, isa);
        var k = PtxKernelCompiler.Shared.Compile("DequantizeNestedBf16", CudaArchitecture.SM_90, isa);
        // ILGPU 1.5.3 writes at most .target sm_80 (the driver JITs it forward); the ISA is the one asked for.
        Assert.Contains(".target sm_80", k.Assembly);
        Assert.Contains(".version 8.4", k.Assembly);
    }

    [Fact]
    public void DequantizeKernelsUse16ByteLoadsAndStores()
    {
        foreach (var name in KernelCatalog.Names.Where(n => n.StartsWith("Dequantize", StringComparison.Ordinal)))
        {
            var ptx = PtxKernelCompiler.Shared.Compile(name, CudaArchitecture.SM_80, CudaInstructionSet.ISA_70).Assembly;
            Assert.Matches(@"\bld(\.global)?\.v4\.(b|u)32", ptx);
            Assert.Matches(@"\bst(\.global)?\.v4\.(b|u)32", ptx);
        }
    }

    [Theory]
    [InlineData(false, FloatType.BFloat16, "b32 view view view view view view b64 b32")]
    [InlineData(true, FloatType.BFloat16, "b32 view view view view view f32 b32 view view view b64 b32")]
    [InlineData(false, FloatType.Float16, "b32 view view view view view view b64 b32")]
    [InlineData(true, FloatType.Float16, "b32 view view view view view f32 b32 view view view b64 b32")]
    [InlineData(false, FloatType.Float32, "b32 view view view view view view b64 b32")]
    [InlineData(true, FloatType.Float32, "b32 view view view view view f32 b32 view view view b64 b32")]
    public void DequantizeParameterListMatchesLauncher(bool nested, FloatType output, string expected)
    {
        var name = CudaFourBitDequantizer.KernelName(nested, output);
        var ptx = PtxKernelCompiler.Shared.Compile(name, CudaArchitecture.SM_80, CudaInstructionSet.ISA_70).Assembly;
        var kinds = PtxKernelCompiler.ParameterTypes(ptx)
            .Select(p => p.StartsWith(".align 8 .b8", StringComparison.Ordinal) && p.EndsWith("[16]", StringComparison.Ordinal) ? "view" : p.Split(' ')[0].TrimStart('.'))
            .ToList();
        Assert.Equal(expected, string.Join(' ', kinds));

        var source = new FourBitPointers
        {
            Packed = 0x1000, Count = 1000, Blocksize = 64, QuantType = QuantType.Nf4,
            Absmax = nested ? 0 : 0x2000, AbsmaxCodes = nested ? 0x3000 : 0, NestedAbsmax = nested ? 0x4000 : 0,
            NestedMap = nested ? 0x5000 : 0, NestedBlocksize = nested ? 256 : 0, Offset = 0.5f,
        };
        using var args = CudaFourBitDequantizer.BuildArguments(source, output, 0x6000, 0x7000);
        Assert.Equal(EntryParameterSizes(ptx), args.Sizes);
    }

    [Theory]
    [InlineData(FloatType.Float32)]
    [InlineData(FloatType.BFloat16)]
    public void AdamParameterListMatchesLauncher(FloatType parameterType)
    {
        var ptx = PtxKernelCompiler.Shared.Compile(CudaAdamW8bit.KernelName(parameterType), CudaArchitecture.SM_80, CudaInstructionSet.ISA_70).Assembly;
        var step = AdamW8bitStep.Create(1e-3f, 0.9f, 0.999f, 1e-8f, 0f, 1);
        using var args = CudaAdamW8bit.BuildArguments(1, 2, 3, 4, 5, 6, 1000, step, 7, 8);
        Assert.Equal(EntryParameterSizes(ptx), args.Sizes);
        Assert.Equal(17, args.Count);
        Assert.Matches(@"\bsqrt\.rn\.f32", ptx);
        Assert.Matches(@"\bdiv\.rn\.f32", ptx);
    }

    [Fact]
    public void ForbidContractionAddsRoundingOnlyWhereMissing()
    {
        const string ptx = "mul.f32 %f1, %f2, %f3;\nadd.ftz.f32 %f4, %f1, %f5;\nmul.rn.f32 %f6, %f1, %f1;\nmul.lo.s32 %r1, %r2, %r3;\nsub.f64 %fd1, %fd2, %fd3;";
        Assert.Equal("mul.rn.f32 %f1, %f2, %f3;\nadd.ftz.rn.f32 %f4, %f1, %f5;\nmul.rn.f32 %f6, %f1, %f1;\nmul.lo.s32 %r1, %r2, %r3;\nsub.f64 %fd1, %fd2, %fd3;",
            PtxKernelCompiler.ForbidContraction(ptx));
    }

    [Fact]
    public void ArchitectureFallsBackForUnknownDevices()
    {
        Assert.Equal(CudaArchitecture.SM_80, PtxKernelCompiler.ArchitectureFor(8, 0));
        Assert.Equal(PtxKernelCompiler.FallbackArchitecture, PtxKernelCompiler.ArchitectureFor(42, 7));
    }
}
