using System.Diagnostics;

namespace QLora.Quant;

/// <summary>
/// Whether a process recorded in a lock or a staging name is still running, so that what a dead process left behind
/// (a lock, a half-written folder) can be taken over or removed while a live owner's is never touched.
/// </summary>
public static class ProcessLiveness
{
    /// <summary>
    /// True when process <paramref name="pid"/> exists and, if <paramref name="startedUtc"/> is given, started at that
    /// time (within a second), so a recycled process id is not mistaken for the original owner.
    /// </summary>
    public static bool IsRunning(int pid, DateTime? startedUtc = null)
    {
        if (pid <= 0) return false;
        try
        {
            using var p = Process.GetProcessById(pid);
            if (p.HasExited) return false;
            if (startedUtc is not { } expected) return true;
            var actual = StartTimeUtc(p);
            return actual is null || Math.Abs((actual.Value - expected).TotalSeconds) < 1.5;
        }
        catch (ArgumentException) { return false; }
        catch (InvalidOperationException) { return false; }
    }

    /// <summary>When the current process started (UTC), recorded beside its PID.</summary>
    public static DateTime? CurrentStartTimeUtc()
    {
        using var p = Process.GetCurrentProcess();
        return StartTimeUtc(p);
    }

    static DateTime? StartTimeUtc(Process p)
    {
        try { return p.StartTime.ToUniversalTime(); }
        catch (Exception e) when (e is InvalidOperationException or System.ComponentModel.Win32Exception or NotSupportedException) { return null; }
    }
}
