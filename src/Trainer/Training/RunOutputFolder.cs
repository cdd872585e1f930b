using QLora.Quant;

namespace QLora.Trainer;

/// <summary>
/// What a training run owns in its output folder, and the only things it ever moves or deletes there: the run's files
/// (<see cref="RunFiles"/>), the checkpoint folders <c>checkpoints/checkpoint-NNNNNN</c>, its unfinished writes
/// (<see cref="WriteLeftovers"/>) and the folder a fresh run sets a previous run aside in. Anything else a user keeps
/// in the folder (or under <c>checkpoints/</c>) is left alone.
/// </summary>
/// <remarks>
/// A fresh run with <c>Output:Overwrite</c> does not delete the previous run's results: after everything was checked
/// and loaded it moves them into <see cref="PreviousRunFolder"/>, deletes that only once the new run has written its
/// first checkpoint (from then on the new run can be resumed, so the folder holds a usable result again), and puts
/// them back if the new run ends without one (an error, Ctrl-C before a checkpoint, or a kill: the next run restores
/// them before anything else).
/// </remarks>
public sealed class RunOutputFolder(string dir)
{
    /// <summary>The files a run writes at the top of its output folder.</summary>
    public static readonly IReadOnlyList<string> RunFiles =
        ["job.json", "run_summary.json", "train_log.jsonl", "loss.png", PeftAdapter.ConfigFile, PeftAdapter.WeightsFile];

    /// <summary>The sub-folder that holds the checkpoints.</summary>
    public const string CheckpointsFolderName = "checkpoints";

    /// <summary>Where a fresh run keeps the previous run's results until its own first checkpoint.</summary>
    public const string PreviousRunFolder = ".qlora-previous-run";

    /// <summary>The output folder.</summary>
    public string Dir { get; } = Path.GetFullPath(dir);

    /// <summary>The checkpoints folder.</summary>
    public string CheckpointsDir => Path.Combine(Dir, CheckpointsFolderName);

    string Aside => Path.Combine(Dir, PreviousRunFolder);

    /// <summary>The run's own entries present now (relative paths: run files, then checkpoints/checkpoint-N).</summary>
    public IReadOnlyList<string> OwnEntries()
    {
        var list = RunFiles.Where(f => File.Exists(Path.Combine(Dir, f))).ToList();
        list.AddRange(new TrainingCheckpoints(CheckpointsDir, int.MaxValue).List()
            .Select(c => Path.Combine(CheckpointsFolderName, Path.GetFileName(c.Path))));
        return list;
    }

    /// <summary>True when the folder holds results of an earlier run.</summary>
    public bool HoldsRun() => OwnEntries().Count > 0;

    /// <summary>
    /// Removes what an interrupted earlier run left unfinished (staging folders, temporary files) and settles a previous
    /// run set aside by a run that was killed before its first checkpoint (restored) or after it (deleted). Call while
    /// holding the folder's <see cref="OutputFolderLock"/>. Every removal is logged.
    /// </summary>
    public void Recover(Action<string>? log)
    {
        WriteLeftovers.Clean(Dir, folderIsOwned: true, log);
        WriteLeftovers.Clean(CheckpointsDir, folderIsOwned: true, log);
        if (!Directory.Exists(Aside)) return;
        if (new TrainingCheckpoints(CheckpointsDir, int.MaxValue).Latest() is null)
        {
            RestorePreviousRun(log);
        }
        else DiscardPreviousRun(log);
    }

    /// <summary>
    /// Moves the previous run's own files and checkpoints into <see cref="PreviousRunFolder"/> (nothing is deleted).
    /// The returned handle deletes them on <see cref="SetAside.Discard"/> (the new run has a checkpoint) and otherwise
    /// puts them back when disposed (the new run ended without one).
    /// </summary>
    public SetAside SetPreviousRunAside(Action<string>? log)
    {
        var entries = OwnEntries();
        var handle = new SetAside(this, log);
        if (entries.Count == 0) return handle;
        Directory.CreateDirectory(Path.Combine(Aside, CheckpointsFolderName));
        foreach (var e in entries) Move(Path.Combine(Dir, e), Path.Combine(Aside, e));
        log?.Invoke($"Output:Overwrite: the previous run's {entries.Count} files and checkpoints are kept in {Aside} until this run's first checkpoint");
        return handle;
    }

    /// <summary>A previous run set aside: discarded once the new run has a checkpoint, else restored on dispose.</summary>
    public sealed class SetAside(RunOutputFolder folder, Action<string>? log) : IDisposable
    {
        bool _settled;

        /// <summary>Deletes the previous run (the new run now has a checkpoint of its own); later calls do nothing.</summary>
        public void Discard()
        {
            if (_settled) return;
            _settled = true;
            folder.DiscardPreviousRun(log);
        }

        /// <summary>Puts the previous run back unless it was discarded.</summary>
        public void Dispose()
        {
            if (_settled) return;
            _settled = true;
            folder.RestorePreviousRun(log);
        }
    }

    /// <summary>Deletes the set-aside previous run (the new run has a checkpoint of its own).</summary>
    public void DiscardPreviousRun(Action<string>? log)
    {
        if (!Directory.Exists(Aside)) return;
        FileReplace.DeleteDirectory(Aside);
        log?.Invoke($"removed the previous run's results kept in {Aside}");
    }

    /// <summary>Puts a set-aside previous run back, replacing what the new run wrote without reaching a checkpoint.</summary>
    public void RestorePreviousRun(Action<string>? log)
    {
        if (!Directory.Exists(Aside)) return;
        foreach (var e in OwnEntries()) // what the replacing run wrote: its own files, no complete checkpoint
        {
            var path = Path.Combine(Dir, e);
            if (Directory.Exists(path)) FileReplace.DeleteDirectory(path);
            else FileReplace.DeleteFile(path);
        }
        var back = new RunOutputFolder(Aside).OwnEntries();
        foreach (var e in back) Move(Path.Combine(Aside, e), Path.Combine(Dir, e));
        FileReplace.DeleteDirectory(Aside);
        log?.Invoke($"restored the previous run's {back.Count} files and checkpoints from {Aside} (the run that replaced them ended without a checkpoint)");
    }

    /// <summary>The per-step log.</summary>
    public string TrainLogPath => Path.Combine(Dir, "train_log.jsonl");

    /// <summary>
    /// Cuts train_log.jsonl back to the steps up to <paramref name="step"/> (the checkpoint a run resumes from), so the
    /// steps between that checkpoint and an interruption are not logged twice. Lines that are not step records are kept.
    /// </summary>
    public void CutTrainLogAfter(int step, Action<string>? log)
    {
        if (!File.Exists(TrainLogPath)) return;
        var lines = File.ReadAllLines(TrainLogPath);
        var kept = lines.Where(l => StepOf(l) is not int s || s <= step).ToList();
        if (kept.Count == lines.Length) return;
        AtomicFile.WriteAllBytes(TrainLogPath, System.Text.Encoding.UTF8.GetBytes(string.Concat(kept.Select(l => l + "\n"))));
        log?.Invoke($"train_log.jsonl: removed {lines.Length - kept.Count} lines after step {step} (logged after the checkpoint this run resumes from)");
    }

    static int? StepOf(string line)
    {
        try
        {
            using var doc = System.Text.Json.JsonDocument.Parse(line);
            return doc.RootElement.ValueKind == System.Text.Json.JsonValueKind.Object && doc.RootElement.TryGetProperty("step", out var s)
                && s.TryGetInt32(out var v) ? v : null;
        }
        catch (System.Text.Json.JsonException) { return int.MaxValue; } // a torn last line written when the process was killed
    }

    static void Move(string from, string to)
    {
        Directory.CreateDirectory(Path.GetDirectoryName(to)!);
        if (Directory.Exists(from)) FileReplace.MoveDirectory(from, to);
        else FileReplace.MoveFile(from, to);
    }
}
