namespace QLora.Quant.Gguf;

/// <summary>
/// A tensor's entry in a GGUF file. <see cref="Shape"/> is in PyTorch order (outermost first, the row length last);
/// the file stores the reverse (ggml's ne[0] is the row length). <see cref="Offset"/> is relative to the data section.
/// </summary>
public sealed record GgufTensorInfo(string Name, GgmlType Type, long[] Shape, long Offset)
{
    /// <summary>Number of elements.</summary>
    public long ElementCount => Shape.Aggregate(1L, (a, d) => checked(a * d));

    /// <summary>Length of a row (ggml's ne[0]).</summary>
    public long Columns => Shape.Length == 0 ? 1 : Shape[^1];

    /// <summary>Bytes of the tensor's data.</summary>
    public long ByteLength => Type.RowBytes(Columns) * (ElementCount / Math.Max(Columns, 1));
}
