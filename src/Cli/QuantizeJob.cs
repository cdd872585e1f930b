using Microsoft.Extensions.Configuration;

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

    private static readonly string[] Keys = [nameof(Input), nameof(Output), nameof(QuantType), nameof(Blocksize), nameof(DoubleQuant), nameof(Include), nameof(Overwrite)];

    /// <summary>
    /// Reads the section from <paramref name="path"/>; returns an empty job if the default file is absent. An unknown key
    /// or a value of the wrong type is an error naming the file, the key and what is allowed.
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
        IConfigurationRoot config;
        try
        {
            config = new ConfigurationBuilder().AddJsonFile(full, optional: false, reloadOnChange: false).Build();
        }
        catch (Exception e) when (e is FormatException or InvalidDataException or IOException)
        {
            throw new FormatException($"{full}: not valid JSON ({(e.InnerException ?? e).Message})");
        }
        var section = config.GetSection("Quantize");
        foreach (var child in section.GetChildren())
            if (!Keys.Contains(child.Key, StringComparer.OrdinalIgnoreCase))
                throw new FormatException($"{full}: unknown key Quantize:{child.Key}; allowed keys are {string.Join(", ", Keys)}");
        var job = new QuantizeJob();
        try
        {
            section.Bind(job, o => o.ErrorOnUnknownConfiguration = true);
        }
        catch (InvalidOperationException e)
        {
            var detail = e.InnerException is { } inner ? $"{e.Message} ({inner.Message})" : e.Message;
            throw new FormatException($"{full}: {detail.ReplaceLineEndings(" ")}");
        }
        var dir = Path.GetDirectoryName(full)!;
        if (job.Input is { } i) job.Input = Path.Combine(dir, i);
        if (job.Output is { } o) job.Output = Path.Combine(dir, o);
        return job;
    }
}
