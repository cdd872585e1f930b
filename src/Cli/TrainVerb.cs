using System.CommandLine;
using System.Globalization;
using System.Runtime.InteropServices;
using QLora.Quant;
using QLora.Trainer;

namespace QLora.Cli;

/// <summary>
/// <c>qlora train [--config job.json] [--resume latest|&lt;checkpoint&gt;] [--Section:Key value ...]</c>: runs a training
/// job from configuration (the root appsettings.json by default), with a progress line on a terminal and plain log
/// lines otherwise; Ctrl-C, Ctrl-Break, SIGTERM or a closed terminal saves a checkpoint and exits (see <see cref="StopSignals"/>). The last line is the run summary as JSON.
/// </summary>
internal static class TrainVerb
{
    /// <summary>Exit code of a run stopped by Ctrl-C after saving its checkpoint (128 + SIGINT, as shells report).</summary>
    public const int InterruptedExitCode = 130;

    /// <summary>
    /// Exit code of a run aborted by a second Ctrl-C before it could save: steps since the last checkpoint are lost
    /// (the checkpoints already written are complete; --resume latest continues from the newest).
    /// </summary>
    public const int AbortedExitCode = 3;

    public static Command Create(TextWriter stdout)
    {
        var config = new Option<string?>("--config") { Description = "the job file (default: ./appsettings.json)" };
        var resume = new Option<string?>("--resume") { Description = "continue from 'latest' (the newest complete checkpoint of Output:Dir) or a checkpoint folder" };
        var emulate = DeviceOptions.EmulateVram();
        var cmd = new Command("train", "QLoRA fine-tuning from a job file; overrides as --Section:Key value (e.g. --Training:LearningRate 1e-4; the device: --Model:Device cuda).")
        {
            config, resume, emulate,
        };
        cmd.TreatUnmatchedTokensAsErrors = false;
        cmd.SetAction(r =>
        {
            NativeHeap.UseLeanPolicy(); // freed activations go back to the system, as the planner assumes
            var jobPath = r.GetValue(config) ?? Path.Combine(Directory.GetCurrentDirectory(), "appsettings.json");
            var job = JobConfiguration.LoadTrainJob(jobPath, r.UnmatchedTokens);
            using var reservation = r.GetValue(emulate) is { } vram
                ? DeviceOptions.Emulate(DeviceSelector.Resolve(job.Model.Device, "Model:Device"), vram, stdout) : null;
            using var stop = new StopSignals(abort: () =>
            {
                // A second Ctrl-C: stop now, without the checkpoint the first one asked for.
                Console.Error.WriteLine($"qlora train: aborted by a second Ctrl-C; steps since the last checkpoint are lost (exit code {AbortedExitCode}); continue with --resume latest");
                OutputFolderLock.ReleaseAll();
                ImmediateExit.Now(AbortedExitCode);
            });
            // Under mpirun the ranks' output is a pseudo-terminal that the launcher copies into its own: plain lines, not a bar.
            var progress = new ProgressDisplay(stdout, interactive: ReferenceEquals(stdout, Console.Out) && !Console.IsOutputRedirected && !MpiLaunch.IsLaunched);
            try
            {
                var result = TrainingRun.Run(job, new TrainingRun.RunOptions
                {
                    Resume = r.GetValue(resume),
                    Log = progress.Line,
                    Progress = progress.Update,
                    Cancellation = stop.Token,
                });
                progress.Finish();
                int exit = result.Summary.Interrupted ? InterruptedExitCode : 0;
                if (result.Rank != 0) return exit; // in a data-parallel run rank 0 reports and writes for all
                var png = Path.Combine(result.Summary.OutputDir, "loss.png");
                if (LossCurvePlot.Write(result.State, png, $"{Path.GetFileName(job.Model.Path)} QLoRA r={job.Lora.Rank}"))
                    stdout.WriteLine($"loss curve: {png}");
                stdout.WriteLine($"summary: {Path.Combine(result.Summary.OutputDir, "run_summary.json")}");
                stdout.WriteLine(result.Summary.ToJsonLine());
                return exit;
            }
            finally
            {
                progress.Finish();
                stop.RunFinished();
            }
        });
        return cmd;
    }

    /// <summary>A one-line progress bar on a terminal; a log line every few steps otherwise.</summary>
    sealed class ProgressDisplay(TextWriter stdout, bool interactive)
    {
        bool _open;
        int _lastLength;

        public void Line(string text)
        {
            Finish();
            stdout.WriteLine(text);
        }

        public void Update(TrainProgress p)
        {
            var text = string.Create(CultureInfo.InvariantCulture,
                $"step {p.Step}/{p.TotalSteps} loss {p.Loss:F4} lr {p.LearningRate:0.###e+0} {p.TokensPerSecond:F0} tok/s elapsed {Clock(p.Elapsed)} eta {Clock(p.Remaining)} mem {ByteSize.Format(p.MemoryBytes)}");
            if (interactive)
            {
                int width = 24, filled = (int)Math.Round(width * (double)p.Step / Math.Max(1, p.TotalSteps));
                var bar = $"\r[{new string('#', filled)}{new string('.', width - filled)}] {text}";
                // Clear what a longer previous line left: ESC[K where the terminal understands it, else spaces.
                stdout.Write(ConsoleAnsi.Supported ? bar + "\u001b[K" : bar.PadRight(Math.Max(bar.Length, _lastLength)));
                _lastLength = bar.Length;
                _open = true;
            }
            else if (p.Step == 1 || p.Step == p.TotalSteps || p.Step % Math.Max(1, p.TotalSteps / 20) == 0)
                stdout.WriteLine(text);
        }

        public void Finish()
        {
            if (!_open) return;
            stdout.WriteLine();
            _open = false;
            _lastLength = 0;
        }

        static string Clock(TimeSpan t) => t.TotalHours >= 1 ? t.ToString(@"h\:mm\:ss", CultureInfo.InvariantCulture) : t.ToString(@"m\:ss", CultureInfo.InvariantCulture);
    }
}
