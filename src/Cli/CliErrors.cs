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

    /// <summary>
    /// A full disk (ENOSPC; Windows ERROR_DISK_FULL) or the process's file size limit (EFBIG, <c>ulimit -f</c>) said
    /// as such, with what to do; null for any other error. Every write of the project goes to a temporary name or a
    /// staging folder first, so what was complete before is still there, and the failed write's files are removed.
    /// </summary>
    public static string? DiskFull(Exception e, string verb)
    {
        int code = e.HResult;
        bool noSpace = e is IOException && (OperatingSystem.IsWindows() ? (code & 0xFFFF) is 0x70 or 0x27 : code == 28);
        // .NET reports EFBIG from a write or SetLength as ArgumentOutOfRangeException("value") thrown inside System.IO.
        bool tooLarge = e is ArgumentOutOfRangeException { ParamName: "value" } && e.TargetSite?.DeclaringType?.Namespace?.StartsWith("System.IO", StringComparison.Ordinal) == true;
        if (!noSpace && !tooLarge) return null;
        var quoted = System.Text.RegularExpressions.Regex.Match(e.Message, "'([^']+)'");
        string where = "";
        if (noSpace && quoted.Success) // an IOException names the file; the EFBIG exception names only its parameter
        {
            string folder = Path.GetDirectoryName(quoted.Groups[1].Value) ?? quoted.Groups[1].Value;
            where = " (writing in " + System.Text.RegularExpressions.Regex.Replace(folder, @"\.partial-[0-9a-f]+-[0-9a-f]+$", "") + ")"; // a staging folder: its target
        }
        string resume = verb.EndsWith(" train", StringComparison.Ordinal) ? "; --resume latest continues from the newest complete checkpoint" : "";
        return noSpace
            ? $"the disk is full{where}; nothing complete was replaced and the unfinished files were removed: free space there or choose another output, then run the command again{resume}"
            : $"a file reached the file size limit (ulimit -f){where}; nothing complete was replaced and the unfinished files were removed: raise the limit, then run the command again{resume}";
    }

    /// <summary>Writes the failure of <paramref name="verb"/> as one line (details to the log file) and returns exit code 1.</summary>
    public static int Report(string verb, Exception e, TextWriter stderr)
    {
        while (e is TargetInvocationException or AggregateException && e.InnerException is { } inner) e = inner;
        var log = WriteLog(verb, e);
        if (DiskFull(e, verb) is { } full) stderr.WriteLine($"{verb}: {full}");
        else if (IsUserFacing(e)) stderr.WriteLine($"{verb}: {Describe(e)}");
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
