using ILGPU.Runtime.Cuda;

namespace QLora.Kernels;

/// <summary>One kernel compiled to PTX for one (architecture, ISA): the text the driver loads and the entry it looks up.</summary>
/// <param name="KernelName">The C# method name (e.g. DequantizeNestedBf16).</param>
/// <param name="EntryName">The <c>.entry</c> name ILGPU emitted, passed to <c>cuModuleGetFunction</c>.</param>
/// <param name="Assembly">The PTX text.</param>
/// <param name="Architecture">The target architecture (<c>.target sm_XX</c>).</param>
/// <param name="InstructionSet">The PTX ISA version (<c>.version X.Y</c>).</param>
public sealed record PtxKernel(string KernelName, string EntryName, string Assembly, CudaArchitecture Architecture,
    CudaInstructionSet InstructionSet);
