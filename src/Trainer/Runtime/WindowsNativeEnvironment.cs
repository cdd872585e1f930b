namespace QLora.Trainer.Runtime;

/// <summary>
/// Environment variables that the Windows libtorch's native runtime reads when it loads, set for this process before
/// any of it loads (the qlora entry point calls <see cref="Apply"/> first thing). A variable the user set is kept.
/// <list type="bullet">
/// <item><c>FOR_DISABLE_CONSOLE_CTRL_HANDLER=1</c>, on Windows: Intel's OpenMP runtime in <c>libtorch-cpu-win-x64</c>
/// (libiomp5md.dll, built with Intel's Fortran runtime) installs a console control handler that ends the process on
/// Ctrl-C ("forrtl: error (200): program aborting due to control-C event"); registered after .NET's, it runs first,
/// so a Ctrl-C would kill a run instead of saving its checkpoint. The same switch that NumPy/SciPy users on Windows set.</item>
/// <item><c>KMP_AFFINITY=disabled</c>, under Wine only: Intel OpenMP otherwise stops on a call Wine 8 lacks
/// ("OMP: Error #179: Function GetNumaNodeProcessorMaskEx() failed"). Real Windows keeps OpenMP's default.</item>
/// </list>
/// </summary>
public static class WindowsNativeEnvironment
{
    /// <summary>Sets the variables this OS needs (none outside Windows); returns the ones it set, as NAME=value.</summary>
    public static IReadOnlyList<string> Apply()
    {
        if (!OperatingSystem.IsWindows()) return [];
        var set = new List<string>();
        SetUnlessPresent("FOR_DISABLE_CONSOLE_CTRL_HANDLER", "1", set);
        if (PlatformFacts.WineVersion() is not null) SetUnlessPresent("KMP_AFFINITY", "disabled", set);
        return set;
    }

    static void SetUnlessPresent(string name, string value, List<string> set)
    {
        if (Environment.GetEnvironmentVariable(name) is not null) return;
        Environment.SetEnvironmentVariable(name, value);
        set.Add($"{name}={value}");
    }
}
