using System.Runtime.InteropServices;

namespace QLora.Quant;

/// <summary>
/// Ends the process at once with an exit code, without running other libraries' exit handlers: a second Ctrl-C must
/// stop a run in the middle of native work, and <see cref="Environment.Exit(int)"/> would run libtorch's static
/// destructors under its running threads, which aborts (exit 134) instead of returning the documented code.
/// POSIX: <c>_exit</c>; Windows: <c>TerminateProcess</c> on itself (ExitProcess would run the DLLs' detach code,
/// libtorch's included, the same trap).
/// </summary>
public static partial class ImmediateExit
{
    /// <summary>Flushes the standard streams and ends the process with <paramref name="code"/>.</summary>
    public static void Now(int code)
    {
        Console.Out.Flush();
        Console.Error.Flush();
        if (OperatingSystem.IsLinux() || OperatingSystem.IsMacOS() || OperatingSystem.IsFreeBSD()) _exit(code);
        if (OperatingSystem.IsWindows()) TerminateProcess(-1, (uint)code); // -1: GetCurrentProcess(); ExitProcess would run DLL detach
        Environment.Exit(code);
    }

    [LibraryImport("libc", EntryPoint = "_exit")]
    private static partial void _exit(int status);

    [LibraryImport("kernel32.dll")]
    [return: MarshalAs(UnmanagedType.Bool)]
    private static partial bool TerminateProcess(IntPtr process, uint exitCode);
}
