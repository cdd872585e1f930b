namespace QLora.Quant;

/// <summary>One tensor of a safetensors file: name, dtype, shape, and where its bytes are.</summary>
public sealed record TensorInfo(string Name, TensorDType DType, long[] Shape, long DataOffset, long ByteLength)
{
    /// <summary>Product of the shape (1 for a scalar).</summary>
    public long ElementCount => Shape.Aggregate(1L, (a, d) => a * d);
}
