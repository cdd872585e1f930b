using System.Reflection;

namespace QLora.Kernels;

/// <summary>Every kernel this project compiles to PTX, by method name: what the build step and CI check iterate over.</summary>
public static class KernelCatalog
{
    private static readonly Dictionary<string, MethodInfo> Kernels = Collect();

    /// <summary>All kernel names, sorted.</summary>
    public static IReadOnlyList<string> Names { get; } = Kernels.Keys.Order(StringComparer.Ordinal).ToList();

    /// <summary>The kernel method called <paramref name="name"/>; throws <see cref="KeyNotFoundException"/> for an unknown name.</summary>
    public static MethodInfo Get(string name) =>
        Kernels.TryGetValue(name, out var m) ? m : throw new KeyNotFoundException($"no kernel named '{name}'; known: {string.Join(", ", Kernels.Keys)}");

    private static Dictionary<string, MethodInfo> Collect()
    {
        var result = new Dictionary<string, MethodInfo>(StringComparer.Ordinal);
        foreach (var type in new[] { typeof(FourBitDequantizeKernels), typeof(AdamW8bitKernel) })
            foreach (var m in type.GetMethods(BindingFlags.Public | BindingFlags.Static))
                if (m.GetParameters() is [{ ParameterType: var p }, ..] && p == typeof(ILGPU.Index1D))
                    result.Add(m.Name, m);
        return result;
    }
}
