namespace QLora.Kernels;

/// <summary>
/// CUDA was asked for but cannot be used here (no driver library, no device, driver too old). The message says what
/// is missing and what to do; callers that can run on the CPU should catch it and fall back.
/// </summary>
public sealed class CudaUnavailableException : Exception
{
    /// <summary>Creates the exception with a message naming what is missing and the remedy.</summary>
    public CudaUnavailableException(string message, Exception? inner = null) : base(message, inner) { }
}
