using QLora.Trainer;

namespace QLora.Cli;

/// <summary>
/// The <c>Quantize</c> section of a job file (the root <c>appsettings.json</c> by default): what <c>qlora quantize</c>
/// does when an option is not given on the command line. Paths are relative to the job file's folder.
/// </summary>
internal sealed class QuantizeJob
{
    public string? Input { get; set; }
    public string? Output { get; set; }
    public string? QuantType { get; set; }
    public int? Blocksize { get; set; }
    public bool? DoubleQuant { get; set; }
    public string? Include { get; set; }
    public bool? Overwrite { get; set; }
    public string? NonFinite { get; set; }

    /// <summary>
    /// Reads the section from <paramref name="path"/>; returns an empty job if the default file is absent. An unknown key
    /// or a value of the wrong type is an error naming the file, the key and what is allowed (the same checks as the
    /// training job's, <see cref="JobConfiguration"/>).
    /// </summary>
    public static QuantizeJob Load(string? path)
    {
        bool explicitPath = path is not null;
        path ??= Path.Combine(Directory.GetCurrentDirectory(), "appsettings.json");
        if (!File.Exists(path))
        {
            if (explicitPath) throw new FileNotFoundException($"--config {path}: no such file");
            return new QuantizeJob();
        }
        var full = Path.GetFullPath(path);
        var job = JobConfiguration.BindSection<QuantizeJob>(JobConfiguration.Build(full, environment: false), "Quantize", full);
        var dir = Path.GetDirectoryName(full)!;
        if (job.Input is { } i) job.Input = Path.Combine(dir, i);
        if (job.Output is { } o) job.Output = Path.Combine(dir, o);
        return job;
    }
}
