namespace QLora.Quant;

/// <summary>What to do with a weight that holds NaN or infinite values.</summary>
public enum NonFinitePolicy
{
    /// <summary>Refuse, naming the tensor and the count (the default: a 4-bit code cannot hold NaN and would store 0.0).</summary>
    Stop,
    /// <summary>Log a warning naming the tensor and the count, and go on.</summary>
    Warn,
}

/// <summary>
/// Finds NaN and infinite values in stored float tensors before they are used: quantizing silently turns them into
/// 0.0, and an adapter with them silently poisons every output, so each is reported with the tensor's name.
/// </summary>
public static class NonFiniteValues
{
    /// <summary>How many elements of <paramref name="data"/> (little-endian <paramref name="type"/>) are NaN or ±infinity.</summary>
    public static long Count(ReadOnlySpan<byte> data, FloatType type)
    {
        int size = type.Size();
        long count = 0;
        Span<float> buffer = stackalloc float[4096];
        for (int at = 0; at < data.Length; at += buffer.Length * size)
        {
            int n = Math.Min(buffer.Length, (data.Length - at) / size);
            var chunk = buffer[..n];
            FloatTypes.ToFloat32(data.Slice(at, n * size), type, chunk);
            foreach (var v in chunk) if (!float.IsFinite(v)) count++;
        }
        return count;
    }

    /// <summary>Parses a policy name (stop or warn), as job files and options spell it.</summary>
    public static NonFinitePolicy ParsePolicy(string name) => name.ToLowerInvariant() switch
    {
        "stop" => NonFinitePolicy.Stop,
        "warn" => NonFinitePolicy.Warn,
        _ => throw new ArgumentException($"non-finite weight policy '{name}': must be stop or warn"),
    };

    /// <summary>
    /// Checks every float tensor of <paramref name="tensors"/>; under <see cref="NonFinitePolicy.Stop"/> the first
    /// one with non-finite values is an <see cref="InvalidDataException"/> naming it (and <paramref name="howToWarn"/>:
    /// the setting that accepts them), else each is reported through <paramref name="log"/>. Returns the total found.
    /// </summary>
    public static long Check(string source, IEnumerable<TensorInfo> tensors, Func<string, ReadOnlySpan<byte>> data, NonFinitePolicy policy,
        Action<string>? log, string howToWarn)
    {
        long total = 0;
        foreach (var t in tensors)
        {
            if (FloatTypes.FromTensorDType(t.DType) is not { } ft || t.ElementCount == 0) continue;
            long n = Count(data(t.Name), ft);
            if (n == 0) continue;
            total += n;
            var what = $"{source}: {t.Name} has {n:N0} non-finite values (NaN or infinity) among {t.ElementCount:N0}";
            if (policy == NonFinitePolicy.Stop)
                throw new InvalidDataException($"{what}; a 4-bit code stores them as 0.0 and training on them gives NaN. Repair the checkpoint, or {howToWarn} to go on with a warning");
            log?.Invoke($"warning: {what}");
        }
        return total;
    }
}
