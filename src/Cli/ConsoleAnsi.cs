using System.Runtime.InteropServices;

namespace QLora.Cli;

/// <summary>
/// Whether the terminal that shows the progress bar understands ANSI escape sequences (the bar clears the rest of its
/// line with ESC[K). Unix terminals do unless TERM is "dumb". A Windows console does once virtual-terminal processing
/// is switched on for it (Windows 10 1511 and later; Windows Terminal has it on): this asks for it, and a console that
/// refuses (older conhost, Wine's) gets a bar redrawn with spaces instead of escape codes.
/// </summary>
internal static partial class ConsoleAnsi
{
    static readonly Lazy<bool> Cached = new(Detect);

    /// <summary>True when escape sequences written to standard output are interpreted, not printed.</summary>
    public static bool Supported => Cached.Value;

    static bool Detect()
    {
        if (!OperatingSystem.IsWindows()) return Environment.GetEnvironmentVariable("TERM") is not "dumb";
        const int StdOutputHandle = -11;
        const uint EnableVirtualTerminalProcessing = 0x0004;
        var handle = GetStdHandle(StdOutputHandle);
        if (handle == IntPtr.Zero || handle == -1 || !GetConsoleMode(handle, out uint mode)) return false;
        return (mode & EnableVirtualTerminalProcessing) != 0 || SetConsoleMode(handle, mode | EnableVirtualTerminalProcessing);
    }

    [LibraryImport("kernel32.dll")]
    private static partial IntPtr GetStdHandle(int handle);

    [LibraryImport("kernel32.dll")]
    [return: MarshalAs(UnmanagedType.Bool)]
    private static partial bool GetConsoleMode(IntPtr handle, out uint mode);

    [LibraryImport("kernel32.dll")]
    [return: MarshalAs(UnmanagedType.Bool)]
    private static partial bool SetConsoleMode(IntPtr handle, uint mode);
}
