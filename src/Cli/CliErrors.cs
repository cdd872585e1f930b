using System.Reflection;
using QLora.Quant;
using QLora.Trainer;

namespace QLora.Cli;

/// <summary>
/// The one place a verb's failure becomes output: a single line on stderr, whatever the exception, so no input ever
/// prints a stack trace. The full exception goes to a log file (named in the line when the failure is not a plain
/// input error, which is a bug worth reporting).
/// </summary>
internal static class CliErrors
{
    /// <summary>True for errors that describe bad input rather than a bug.</summary>
    public static bool IsUserFacing(Exception e) => e is SafetensorsFormatException or Quant.Gguf.GgufFormatException or FormatException or IOException
        or UnauthorizedAccessException or ArgumentException or InvalidOperationException or NotSupportedException
        or PlatformNotSupportedException or OutOfMemoryException or InvalidDataException or TokenizerMismatchException;

    /// <summary>The message, on one line.</summary>
    public static string Describe(Exception e) => e.Message.ReplaceLineEndings(" ");

    /// <summary>Writes the failure of <paramref name="verb"/> as one line (details to the log file) and returns exit code 1.</summary>
    public static int Report(string verb, Exception e, TextWriter stderr)
    {
        while (e is TargetInvocationException or AggregateException && e.InnerException is { } inner) e = inner;
        var log = WriteLog(verb, e);
        if (IsUserFacing(e)) stderr.WriteLine($"{verb}: {Describe(e)}");
        else stderr.WriteLine($"{verb}: unexpected error ({e.GetType().Name}): {Describe(e)}" + (log is null ? "" : $"; details in {log}"));
        return 1;
    }

    /// <summary>The folder the error logs go to (the system's temporary folder).</summary>
    public static string LogFolder => Path.Combine(Path.GetTempPath(), "qlora-logs");

    static string? WriteLog(string verb, Exception e)
    {
        try
        {
            Directory.CreateDirectory(LogFolder);
            var path = Path.Combine(LogFolder, $"qlora-{DateTime.UtcNow:yyyyMMdd-HHmmss}-{Environment.ProcessId}.log");
            File.AppendAllText(path, $"{DateTime.UtcNow:O} {verb} {string.Join(' ', Environment.GetCommandLineArgs().Skip(1))}\n{e}\n\n");
            return path;
        }
        catch (Exception io) when (io is IOException or UnauthorizedAccessException)
        {
            return null;
        }
    }
}
