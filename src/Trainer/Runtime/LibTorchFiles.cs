namespace QLora.Trainer.Runtime;

/// <summary>
/// The libtorch libraries the TorchSharp shim needs, by operating system, in the order they must be loaded: each one's
/// dependencies before it, so that loading by full path never makes the OS loader look for a sibling elsewhere.
/// </summary>
public static class LibTorchFiles
{
    /// <summary>The core libraries (c10, torch_cpu, torch) in load order, with the CUDA pair slotted in before torch when present.</summary>
    public static IReadOnlyList<string> LoadOrder(bool cuda) => cuda
        ? [Name("c10"), Name("torch_cpu"), Name("c10_cuda"), Name("torch_cuda"), Name("torch")]
        : [Name("c10"), Name("torch_cpu"), Name("torch")];

    /// <summary>The files without which the shim cannot load.</summary>
    public static IReadOnlyList<string> Required => LoadOrder(cuda: false);

    /// <summary>The CUDA pair: both present means a CUDA build.</summary>
    public static IReadOnlyList<string> Cuda => [Name("c10_cuda"), Name("torch_cuda")];

    /// <summary>Every libtorch file name whose presence in a folder means "a libtorch lives here".</summary>
    public static IReadOnlyList<string> All => LoadOrder(cuda: true);

    /// <summary>The TorchSharp shim's file name.</summary>
    public static string Shim => Name("LibTorchSharp");

    /// <summary>The platform's file name of library <paramref name="stem"/> (<c>libc10.so</c>, <c>c10.dll</c>, <c>libc10.dylib</c>).</summary>
    public static string Name(string stem) =>
        OperatingSystem.IsWindows() ? stem + ".dll" : OperatingSystem.IsMacOS() ? "lib" + stem + ".dylib" : "lib" + stem + ".so";
}
