namespace QLora.Quant.Gguf;

/// <summary>A GGUF file that is malformed, truncated or uses something this reader does not know; the message is "&lt;path&gt;: &lt;problem&gt;".</summary>
public sealed class GgufFormatException : Exception
{
    /// <summary>Creates the exception for <paramref name="filePath"/>.</summary>
    public GgufFormatException(string filePath, string problem, Exception? innerException = null)
        : base($"{filePath}: {problem}", innerException) => FilePath = filePath;

    /// <summary>The file that failed validation.</summary>
    public string FilePath { get; }
}
