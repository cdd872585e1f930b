using System.Collections.Concurrent;
using System.Reflection;
using System.Text.RegularExpressions;
using ILGPU;
using ILGPU.Backends.EntryPoints;
using ILGPU.Backends.PTX;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;

namespace QLora.Kernels;

/// <summary>
/// Compiles this project's kernels to PTX with ILGPU used as a compiler only: a context with no accelerator and a
/// <see cref="PTXBackend"/>, so it runs (and CI checks it) on machines without a GPU. Results are cached per
/// (kernel, architecture, ISA) for the life of the process.
/// </summary>
/// <remarks>
/// The PTX is post-processed in one way: every float32 <c>add/sub/mul</c> without a rounding modifier gets
/// <c>.rn</c>. PTX lets the JIT contract an unmodified multiply and add into an FMA (one rounding), which would break
/// bit-identity with the C# references (two roundings); <c>.rn</c> forbids that contraction and changes nothing else.
/// </remarks>
public sealed partial class PtxKernelCompiler : IDisposable
{
    private readonly Context _context;
    private readonly ConcurrentDictionary<(string, CudaArchitecture, CudaInstructionSet), PtxKernel> _cache = new();
    private readonly Lock _compileLock = new();

    /// <summary>The architecture kernels are compiled for when the device's own is newer than ILGPU knows (the driver JITs forward).</summary>
    public static CudaArchitecture FallbackArchitecture => CudaArchitecture.SM_80;

    /// <summary>The PTX ISA used when the caller gives none: 7.0, which every CUDA 11+ driver reads.</summary>
    public static CudaInstructionSet DefaultInstructionSet => CudaInstructionSet.ISA_70;

    /// <summary>The process-wide compiler (ILGPU contexts are heavy; one is enough).</summary>
    public static PtxKernelCompiler Shared => SharedInstance.Value;

    private static readonly Lazy<PtxKernelCompiler> SharedInstance = new(() => new PtxKernelCompiler());

    /// <summary>Creates a compiler with its own ILGPU context (no accelerators, IEEE math, optimised).</summary>
    public PtxKernelCompiler() =>
        _context = Context.Create(b => b.Math(MathMode.Default).Optimize(OptimizationLevel.O1));

    /// <summary>Compiles (or returns the cached PTX of) an implicitly grouped kernel method.</summary>
    public PtxKernel Compile(MethodInfo kernel, CudaArchitecture architecture, CudaInstructionSet instructionSet)
    {
        ArgumentNullException.ThrowIfNull(kernel);
        var key = (kernel.DeclaringType?.FullName + "." + kernel.Name, architecture, instructionSet);
        return _cache.GetOrAdd(key, _ => CompileUncached(kernel, architecture, instructionSet));
    }

    /// <summary>Compiles a kernel by name from <see cref="KernelCatalog"/>.</summary>
    public PtxKernel Compile(string kernelName, CudaArchitecture architecture, CudaInstructionSet instructionSet) =>
        Compile(KernelCatalog.Get(kernelName), architecture, instructionSet);

    /// <summary>The architecture to compile for a device of compute capability major.minor: its own if ILGPU knows it, else <see cref="FallbackArchitecture"/>.</summary>
    public static CudaArchitecture ArchitectureFor(int major, int minor)
    {
        var arch = new CudaArchitecture(major, minor);
        return KnownArchitectures.Contains(arch) ? arch : FallbackArchitecture;
    }

    private static readonly HashSet<CudaArchitecture> KnownArchitectures = typeof(CudaArchitecture)
        .GetFields(BindingFlags.Public | BindingFlags.Static)
        .Where(f => f.FieldType == typeof(CudaArchitecture))
        .Select(f => (CudaArchitecture)f.GetValue(null)!)
        .ToHashSet();

    private PtxKernel CompileUncached(MethodInfo kernel, CudaArchitecture architecture, CudaInstructionSet instructionSet)
    {
        lock (_compileLock)
        {
            using var backend = new PTXBackend(_context, new CudaCapabilityContext(architecture), architecture, instructionSet, null);
            var entry = EntryPointDescription.FromImplicitlyGroupedKernel(kernel);
            var compiled = (PTXCompiledKernel)backend.Compile(entry, new KernelSpecialization());
            string ptx = ForbidContraction(compiled.PTXAssembly);
            var match = EntryRegex().Match(ptx);
            if (!match.Success) throw new InvalidOperationException($"ILGPU emitted no .entry for {kernel.Name}");
            return new PtxKernel(kernel.Name, match.Groups[1].Value, ptx, architecture, instructionSet);
        }
    }

    /// <summary>Adds <c>.rn</c> to float32 add/sub/mul instructions that have no rounding modifier (see the class remarks).</summary>
    public static string ForbidContraction(string ptx) => UnroundedF32Regex().Replace(ptx, "$1.rn$2");

    /// <summary>The parameter lines of a PTX entry, in order (e.g. <c>.param .b32 ..._0</c>), for checks.</summary>
    public static IReadOnlyList<string> ParameterTypes(string ptx)
    {
        var entry = ptx.IndexOf(".entry", StringComparison.Ordinal);
        if (entry < 0) return [];
        var open = ptx.IndexOf('(', entry);
        var close = ptx.IndexOf(')', open);
        return ParamRegex().Matches(ptx[open..close]).Select(m => m.Groups[1].Value).ToList();
    }

    [GeneratedRegex(@"\.entry\s+([A-Za-z_$][A-Za-z0-9_$]*)")]
    private static partial Regex EntryRegex();

    [GeneratedRegex(@"\b((?:add|sub|mul)(?:\.ftz)?)(\.f32\b)")]
    private static partial Regex UnroundedF32Regex();

    [GeneratedRegex(@"\.param\s+((?:\.align\s+\d+\s+)?\.[a-z0-9]+(?:\s+[A-Za-z0-9_$]+)?(?:\[\d+\])?)")]
    private static partial Regex ParamRegex();

    /// <summary>Releases the ILGPU context.</summary>
    public void Dispose() => _context.Dispose();
}
