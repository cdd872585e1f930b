using ILGPU;
using ILGPU.Runtime.CPU;

namespace QLora.Kernels.Tests;

/// One ILGPU context with a CPU accelerator shared by the kernel tests (creating one costs ~100 ms).
public sealed class CpuAcceleratorFixture : IDisposable
{
    public CpuAcceleratorFixture()
    {
        Context = Context.Create(b => b.CPU().Math(MathMode.Default));
        Runner = new AcceleratorKernelRunner(Context.CreateCPUAccelerator(0));
    }

    public Context Context { get; }
    public AcceleratorKernelRunner Runner { get; }

    public void Dispose()
    {
        Runner.Accelerator.Dispose();
        Context.Dispose();
    }
}

[CollectionDefinition(Name)]
public sealed class CpuAcceleratorCollection : ICollectionFixture<CpuAcceleratorFixture>
{
    public const string Name = "cpu accelerator";
}
