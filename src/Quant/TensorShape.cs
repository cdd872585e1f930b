namespace QLora.Quant;

/// <summary>Arithmetic on tensor shapes, overflow-checked because shapes come from untrusted files.</summary>
public static class TensorShape
{
    /// <summary>The product of the dimensions (1 for a scalar); throws <see cref="OverflowException"/> past long.</summary>
    public static long ElementCount(ReadOnlySpan<long> shape)
    {
        long n = 1;
        foreach (var d in shape) n = checked(n * d);
        return n;
    }
}
