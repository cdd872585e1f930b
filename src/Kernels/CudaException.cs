namespace QLora.Kernels;

/// <summary>A CUDA driver API call returned an error; carries the <c>CUresult</c> code and the driver's name for it.</summary>
public sealed class CudaException : Exception
{
    /// <summary>Creates the exception for <paramref name="result"/> returned by <paramref name="call"/>.</summary>
    public CudaException(string call, int result, string name, string description)
        : base($"{call} failed: {name} ({result}): {description}")
    {
        Call = call;
        Result = result;
        ErrorName = name;
    }

    /// <summary>The driver function that failed.</summary>
    public string Call { get; }

    /// <summary>The raw <c>CUresult</c>.</summary>
    public int Result { get; }

    /// <summary>The driver's symbolic name for <see cref="Result"/> (e.g. CUDA_ERROR_ILLEGAL_ADDRESS).</summary>
    public string ErrorName { get; }
}
