using System.Runtime.InteropServices;

namespace QLora.GpuCheck;

/// <summary>
/// The CUDA runtime API (libcudart), found on the machine by probing common names and paths — the API libtorch
/// allocates with. It works in the device's primary context, so memory from <c>cudaMalloc</c> stands in for a torch
/// tensor's storage.
/// </summary>
internal sealed unsafe class CudaRuntimeLibrary
{
    private readonly delegate* unmanaged<int, int> _setDevice;
    private readonly delegate* unmanaged<void**, nuint, int> _malloc;
    private readonly delegate* unmanaged<void*, int> _free;
    private readonly delegate* unmanaged<int*, int> _runtimeGetVersion;
    private readonly delegate* unmanaged<int, byte*> _getErrorString;

    private CudaRuntimeLibrary(nint handle, string path)
    {
        Path = path;
        _setDevice = (delegate* unmanaged<int, int>)NativeLibrary.GetExport(handle, "cudaSetDevice");
        _malloc = (delegate* unmanaged<void**, nuint, int>)NativeLibrary.GetExport(handle, "cudaMalloc");
        _free = (delegate* unmanaged<void*, int>)NativeLibrary.GetExport(handle, "cudaFree");
        _runtimeGetVersion = (delegate* unmanaged<int*, int>)NativeLibrary.GetExport(handle, "cudaRuntimeGetVersion");
        _getErrorString = (delegate* unmanaged<int, byte*>)NativeLibrary.GetExport(handle, "cudaGetErrorString");
    }

    /// <summary>Where the library was loaded from.</summary>
    public string Path { get; }

    /// <summary>Loads the first libcudart found (QLORA_CUDART overrides the search); null with the places tried when none is.</summary>
    public static CudaRuntimeLibrary? TryLoad(out string searched)
    {
        var candidates = Candidates().Distinct().ToList();
        searched = string.Join(", ", candidates.Take(12)) + (candidates.Count > 12 ? $", … ({candidates.Count} in all)" : "");
        foreach (var c in candidates)
            if (NativeLibrary.TryLoad(c, out var h))
            {
                try
                {
                    return new CudaRuntimeLibrary(h, c);
                }
                catch (EntryPointNotFoundException)
                {
                }
            }
        return null;
    }

    private static IEnumerable<string> Candidates()
    {
        if (Environment.GetEnvironmentVariable("QLORA_CUDART") is { Length: > 0 } overridden) yield return overridden;
        if (OperatingSystem.IsWindows())
        {
            foreach (var v in new[] { "13", "12", "110", "11" }) yield return $"cudart64_{v}.dll";
            yield break;
        }
        foreach (var n in new[] { "libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0" }) yield return n;
        var dirs = new List<string> { "/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/opt/conda/lib" };
        foreach (var root in new[] { "/usr/local", "/opt" })
            if (Directory.Exists(root))
                dirs.AddRange(SafeDirs(root, "cuda-*").Select(d => System.IO.Path.Combine(d, "lib64")));
        // pip wheels (torch's own runtime): .../site-packages/nvidia/cuda_runtime/lib
        foreach (var root in new[] { "/usr/local/lib", "/usr/lib", "/opt/conda/lib", System.IO.Path.Combine(Environment.GetEnvironmentVariable("HOME") ?? "/root", ".local/lib") })
            foreach (var py in SafeDirs(root, "python3*"))
                foreach (var sp in new[] { "site-packages", "dist-packages" })
                    dirs.Add(System.IO.Path.Combine(py, sp, "nvidia", "cuda_runtime", "lib"));
        foreach (var d in dirs.Where(Directory.Exists))
            foreach (var f in Directory.EnumerateFiles(d, "libcudart.so*").Order(StringComparer.Ordinal))
                yield return f;
    }

    private static IEnumerable<string> SafeDirs(string root, string pattern)
    {
        try
        {
            return Directory.Exists(root) ? Directory.GetDirectories(root, pattern) : [];
        }
        catch (IOException)
        {
            return [];
        }
        catch (UnauthorizedAccessException)
        {
            return [];
        }
    }

    /// <summary>Throws unless <paramref name="result"/> is cudaSuccess.</summary>
    public void Check(int result, string call)
    {
        if (result != 0)
            throw new InvalidOperationException($"{call} failed: cudaError {result}: {System.Runtime.InteropServices.Marshal.PtrToStringUTF8((nint)_getErrorString(result))}");
    }

    /// <summary>The runtime version (e.g. 12040).</summary>
    public int Version()
    {
        int v;
        Check(_runtimeGetVersion(&v), "cudaRuntimeGetVersion");
        return v;
    }

    /// <summary>cudaSetDevice: binds the calling thread to the device's primary context.</summary>
    public void SetDevice(int ordinal) => Check(_setDevice(ordinal), "cudaSetDevice");

    /// <summary>cudaMalloc.</summary>
    public ulong Malloc(long bytes)
    {
        void* p;
        Check(_malloc(&p, (nuint)bytes), $"cudaMalloc({bytes})");
        return (ulong)p;
    }

    /// <summary>cudaFree.</summary>
    public void Free(ulong pointer) => Check(_free((void*)pointer), "cudaFree");
}
