using System.Collections.Concurrent;
using System.Diagnostics;

namespace QLora.Cli.Tests;

/// <summary>
/// <c>mpirun --allow-run-as-root --oversubscribe -np N dotnet qlora.dll ...</c> as a child process: its merged output
/// line by line, its ranks' process ids (children of mpirun, told apart by OMPI_COMM_WORLD_RANK), and a kill of the
/// whole tree when a test is done with it.
/// </summary>
internal sealed class MpiJob : IDisposable
{
    readonly Process _process;
    readonly BlockingCollection<string> _lines = new();
    readonly ConcurrentQueue<string> _all = new();

    /// <summary>mpirun's path, or null when Open MPI is not installed (the tests then skip).</summary>
    public static string? Mpirun { get; } = Environment.GetEnvironmentVariable("PATH")?.Split(':')
        .Select(d => Path.Combine(d, "mpirun")).FirstOrDefault(File.Exists);

    public static string QloraDll => Path.Combine(AppContext.BaseDirectory, "qlora.dll");

    public MpiJob(int ranks, string workingDirectory, params string[] qloraArgs)
    {
        var psi = new ProcessStartInfo(Mpirun ?? throw new InvalidOperationException("mpirun is not installed"))
        {
            WorkingDirectory = workingDirectory, RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false,
        };
        foreach (var a in new[] { "--allow-run-as-root", "--oversubscribe", "-np", ranks.ToString(System.Globalization.CultureInfo.InvariantCulture), "dotnet", QloraDll }.Concat(qloraArgs))
            psi.ArgumentList.Add(a);
        _process = new Process { StartInfo = psi };
        _process.OutputDataReceived += (_, e) => Add(e.Data);
        _process.ErrorDataReceived += (_, e) => Add(e.Data);
        _process.Start();
        _process.BeginOutputReadLine();
        _process.BeginErrorReadLine();
    }

    void Add(string? line)
    {
        if (line is null) return;
        _all.Enqueue(line);
        _lines.Add(line);
    }

    /// <summary>Everything printed so far.</summary>
    public string Output => string.Join("\n", _all);

    /// <summary>Waits for a line matching <paramref name="match"/>; false when the job ended or the time ran out first.</summary>
    public bool WaitForLine(Func<string, bool> match, TimeSpan timeout)
    {
        var end = DateTime.UtcNow + timeout;
        while (DateTime.UtcNow < end)
        {
            if (_lines.TryTake(out var line, 200)) { if (match(line)) return true; }
            else if (_process.HasExited) return false;
        }
        return false;
    }

    /// <summary>Waits for mpirun to exit; null when it had not within <paramref name="timeout"/> (the job is then killed).</summary>
    public int? WaitForExit(TimeSpan timeout)
    {
        if (!_process.WaitForExit(timeout)) { Dispose(); return null; }
        _process.WaitForExit(); // drains the output
        return _process.ExitCode;
    }

    /// <summary>The process id of <paramref name="rank"/> (a child of mpirun).</summary>
    public int RankPid(int rank)
    {
        foreach (var dir in Directory.GetDirectories("/proc"))
        {
            if (!int.TryParse(Path.GetFileName(dir), out int pid)) continue;
            try
            {
                var stat = File.ReadAllText(Path.Combine(dir, "stat"));
                int ppid = int.Parse(stat[(stat.LastIndexOf(')') + 2)..].Split(' ')[1], System.Globalization.CultureInfo.InvariantCulture);
                if (ppid != _process.Id) continue;
                var env = File.ReadAllText(Path.Combine(dir, "environ")).Split('\0');
                if (env.Contains($"OMPI_COMM_WORLD_RANK={rank}")) return pid;
            }
            catch (IOException) { }
            catch (UnauthorizedAccessException) { }
        }
        throw new InvalidOperationException($"rank {rank} of mpirun {_process.Id} not found");
    }

    /// <summary>Sends <paramref name="signal"/> (kill's name: TERM, KILL, STOP, CONT) to a process.</summary>
    public static void Signal(int pid, string signal)
    {
        using var kill = Process.Start(new ProcessStartInfo("kill", $"-{signal} {pid}") { UseShellExecute = false })!;
        kill.WaitForExit();
    }

    public void Dispose()
    {
        if (!_process.HasExited)
        {
            try { _process.Kill(entireProcessTree: true); } catch (InvalidOperationException) { }
            _process.WaitForExit(10_000);
        }
        _process.Dispose();
    }
}
