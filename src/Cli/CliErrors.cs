using QLora.Quant;
using QLora.Trainer;

namespace QLora.Cli;

/// <summary>Which failures are the user's input (bad files, options) and how to say them in one line.</summary>
internal static class CliErrors
{
    /// <summary>True for errors that describe bad input rather than a bug.</summary>
    public static bool IsUserFacing(Exception e) => e is SafetensorsFormatException or Quant.Gguf.GgufFormatException or FormatException or IOException
        or UnauthorizedAccessException or ArgumentException or InvalidOperationException or NotSupportedException
        or PlatformNotSupportedException or OutOfMemoryException or InvalidDataException or TokenizerMismatchException;

    /// <summary>The message, on one line.</summary>
    public static string Describe(Exception e) => e.Message.ReplaceLineEndings(" ");
}
