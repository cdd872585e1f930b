using System.Diagnostics;
using System.Text;

namespace QLora.Cli.Tests;

/// <summary>
/// The real <c>qlora</c> command as a child process (the built qlora.dll under <c>dotnet</c>), for what only a process
/// shows: signals, exit codes set by the runtime, locks left by a killed process.
/// </summary>
internal sealed class CliProcess : IDisposable
{
    readonly Process _process;
    readonly StringBuilder _stdout = new(), _stderr = new();

    public CliProcess(params string[] args)
    {
        var dotnet = Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet";
        // A test run started as a background job (`cmd &`, nohup) ignores SIGINT, and a child inherits that: .NET then
        // leaves Ctrl-C ignored, as a background program should. The child is what is under test, so it starts with
        // SIGINT at its default (coreutils env), as under a terminal.
        bool resetInterrupt = OperatingSystem.IsLinux() && InterruptIgnored();
        var info = new ProcessStartInfo(resetInterrupt ? "env" : dotnet) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        if (resetInterrupt)
        {
            info.ArgumentList.Add("--default-signal=INT");
            info.ArgumentList.Add(dotnet);
        }
        info.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "qlora.dll"));
        foreach (var a in args) info.ArgumentList.Add(a);
        _process = new Process { StartInfo = info };
        _process.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (_stdout) _stdout.AppendLine(e.Data); };
        _process.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (_stderr) _stderr.AppendLine(e.Data); };
        _process.Start();
        _process.BeginOutputReadLine();
        _process.BeginErrorReadLine();
    }

    /// <summary>Whether this process ignores SIGINT (bit 2 of <c>SigIgn</c> in /proc/self/status: signal 2).</summary>
    static bool InterruptIgnored()
    {
        var line = File.ReadLines("/proc/self/status").FirstOrDefault(l => l.StartsWith("SigIgn:", StringComparison.Ordinal));
        return line is not null && (Convert.ToUInt64(line["SigIgn:".Length..].Trim(), 16) & 0b10) != 0;
    }

    public int Id => _process.Id;
    public string Stdout { get { lock (_stdout) return _stdout.ToString(); } }
    public string Stderr { get { lock (_stderr) return _stderr.ToString(); } }

    /// <summary>
    /// Waits until stdout from character <paramref name="after"/> on contains <paramref name="text"/> (false if the
    /// process ended or the time ran out first).
    /// </summary>
    public bool WaitForOutput(string text, TimeSpan timeout, int after = 0)
    {
        var sw = Stopwatch.StartNew();
        bool Seen() => Stdout.AsSpan(Math.Min(after, Stdout.Length)).Contains(text, StringComparison.Ordinal);
        while (sw.Elapsed < timeout)
        {
            if (Seen()) return true;
            if (_process.HasExited) return Seen();
            Thread.Sleep(50);
        }
        return false;
    }

    /// <summary>Sends a POSIX signal (INT, TERM, KILL) with the system's kill command.</summary>
    public void Signal(string name)
    {
        using var kill = Process.Start(new ProcessStartInfo("kill") { ArgumentList = { "-" + name, Id.ToString(System.Globalization.CultureInfo.InvariantCulture) }, UseShellExecute = false })!;
        kill.WaitForExit();
    }

    /// <summary>The exit code, after waiting for the process to end.</summary>
    public int WaitForExit(TimeSpan timeout)
    {
        if (!_process.WaitForExit(timeout)) throw new TimeoutException($"qlora did not exit within {timeout}: {Stdout}{Stderr}");
        _process.WaitForExit(); // drains the output
        return _process.ExitCode;
    }

    public void Dispose()
    {
        try { if (!_process.HasExited) _process.Kill(entireProcessTree: true); } catch (InvalidOperationException) { }
        _process.Dispose();
    }
}
