namespace QLora.Trainer;

/// <summary>A dataset line that is not valid JSON or not one of the supported sample shapes; the message names the file and line.</summary>
public sealed class DataFormatException(string message) : FormatException(message);
