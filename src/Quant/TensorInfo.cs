namespace QLora.Quant;

/// <summary>
/// Where one tensor of a safetensors file lives: its name, element type, shape, and the absolute byte range in the file
/// (<see cref="DataOffset"/> counts from the start of the file, not from the start of the data area).
/// </summary>
/// <param name="Name">The tensor's key in the header.</param>
/// <param name="DType">Element type.</param>
/// <param name="Shape">Dimensions, outermost first; empty for a scalar.</param>
/// <param name="DataOffset">Absolute offset of the first byte in the file.</param>
/// <param name="ByteLength">Number of bytes: <see cref="ElementCount"/> times the element size.</param>
public sealed record TensorInfo(string Name, TensorDType DType, long[] Shape, long DataOffset, long ByteLength)
{
    /// <summary>Product of the dimensions (1 for a scalar, 0 when any dimension is 0).</summary>
    public long ElementCount => TensorShape.ElementCount(Shape);
}
