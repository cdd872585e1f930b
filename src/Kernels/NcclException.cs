namespace QLora.Kernels;

/// <summary>An NCCL call failed: the call, NCCL's result code and its words.</summary>
public sealed class NcclException(string call, int result, string text) : Exception($"{call} failed: {text} (NCCL result {result})")
{
    /// <summary>NCCL's result code.</summary>
    public int Result { get; } = result;
}
