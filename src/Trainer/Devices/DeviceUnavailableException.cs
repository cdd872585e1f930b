namespace QLora.Trainer;

/// <summary>
/// A device was asked for that this machine cannot run on (no NVIDIA driver, a CPU-only libtorch, no such CUDA device).
/// The message is one line: what is missing and what to do.
/// </summary>
public sealed class DeviceUnavailableException : InvalidOperationException
{
    /// <summary>Creates the exception with its one-line explanation.</summary>
    public DeviceUnavailableException(string message, Exception? inner = null) : base(message, inner) { }
}
