namespace QLora.Quant;

/// <summary>Named tensors that can be looked up and read one at a time (a safetensors file or a sharded checkpoint).</summary>
public interface ITensorSource
{
    /// <summary>Every tensor's description.</summary>
    IReadOnlyList<TensorInfo> Tensors { get; }

    /// <summary>True if a tensor of that name exists.</summary>
    bool Contains(string name);

    /// <summary>The tensor's description; throws a format error naming the file if it is missing.</summary>
    TensorInfo GetInfo(string name);

    /// <summary>A copy of the tensor's raw bytes.</summary>
    byte[] ReadBytes(string name);
}
