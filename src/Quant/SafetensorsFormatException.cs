namespace QLora.Quant;

/// <summary>
/// A safetensors file or sharded checkpoint that is malformed or inconsistent. Every validation failure of the
/// reader surfaces as this type, so callers can tell a bad file from a bug; the message is "&lt;path&gt;: &lt;problem&gt;".
/// </summary>
public sealed class SafetensorsFormatException : Exception
{
    /// <summary>Creates the exception for <paramref name="filePath"/>, describing what is wrong in <paramref name="problem"/>.</summary>
    public SafetensorsFormatException(string filePath, string problem, Exception? innerException = null)
        : base($"{filePath}: {problem}", innerException)
    {
        FilePath = filePath;
        Problem = problem;
    }

    /// <summary>The file (or index file) that failed validation, as it was given to the reader.</summary>
    public string FilePath { get; }

    /// <summary>What is wrong, without the file name.</summary>
    public string Problem { get; }
}
