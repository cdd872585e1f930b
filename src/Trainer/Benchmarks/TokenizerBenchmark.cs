using System.Diagnostics;
using System.Text.Json;

namespace QLora.Trainer;

/// <summary>
/// <c>qlora bench tokenizer</c>: the managed tokenizer against the native one (Hugging Face's Rust library, where it is
/// published) on the same texts, alternated in one run so a busy machine slows both alike: tokens per second of
/// <see cref="HfTokenizer.Encode"/> (add_special_tokens=false, one call per text, as training encodes a sample), and
/// whether every text got identical ids. Texts: each string value of a JSONL line (message contents, prompt,
/// completion, text), and other files cut at line ends into pieces of about 2,000 characters.
/// </summary>
public static class TokenizerBenchmark
{
    /// <summary>What to measure.</summary>
    public sealed record Options
    {
        /// <summary>A model folder or a tokenizer.json.</summary>
        public required string Tokenizer { get; init; }
        /// <summary>Files or folders of text (folders: their *.jsonl, *.md, *.txt and *.cs files, recursively).</summary>
        public required IReadOnlyList<string> Texts { get; init; }
        /// <summary>Timed passes of each implementation (alternating); the medians are reported.</summary>
        public int Repeats { get; init; } = 5;
    }

    /// <summary>One implementation's figures.</summary>
    public sealed record Side(string Implementation, double Seconds, double TokensPerSecond, double ColdSeconds, IReadOnlyList<double> Runs);

    /// <summary>Both sides (native null where it is not available) and the agreement.</summary>
    public sealed record Result(int Texts, long Characters, long Tokens, Side Managed, Side? Native, int IdenticalTexts)
    {
        /// <summary>Managed tokens/s over native tokens/s (above 1: the managed one is faster).</summary>
        public double? Ratio => Native is null ? null : Managed.TokensPerSecond / Native.TokensPerSecond;

        /// <summary>The one JSON line.</summary>
        public string ToJson() => JsonSerializer.Serialize(new
        {
            bench = "tokenizer", texts = Texts, characters = Characters, tokens = Tokens,
            managed_tokens_per_s = Math.Round(Managed.TokensPerSecond), native_tokens_per_s = Native is null ? (double?)null : Math.Round(Native.TokensPerSecond),
            managed_over_native = Ratio is double r ? Math.Round(r, 3) : (double?)null,
            identical_texts = Native is null ? (int?)null : IdenticalTexts,
            managed_s = Math.Round(Managed.Seconds, 4), native_s = Native is null ? (double?)null : Math.Round(Native.Seconds, 4),
            managed_cold_s = Math.Round(Managed.ColdSeconds, 4), native_cold_s = Native is null ? (double?)null : Math.Round(Native.ColdSeconds, 4),
            managed_runs_s = Managed.Runs.Select(s => Math.Round(s, 4)), native_runs_s = Native?.Runs.Select(s => Math.Round(s, 4)),
        });
    }

    /// <summary>Reads the texts, then times both implementations.</summary>
    public static Result Run(Options o, Action<string> log)
    {
        if (o.Repeats < 1)
            throw new ArgumentException("repeats must be >= 1");
        var texts = ReadTexts(o.Texts);
        if (texts.Count == 0)
            throw new ArgumentException("the text files hold no text to tokenize");
        HfTokenizer Load(TokenizerImplementation impl) => File.Exists(o.Tokenizer) ? HfTokenizer.FromFile(o.Tokenizer, impl) : HfTokenizer.Load(o.Tokenizer, impl);
        using var managed = Load(TokenizerImplementation.Managed);
        using var native = TokenizerSelection.NativePlatform ? Load(TokenizerImplementation.Native) : null;
        if (native is null)
            log("the native tokenizer is not published for this platform: timing the managed one only");

        // Cold passes (word caches empty) also give the ids to compare.
        var sw = Stopwatch.StartNew();
        var managedIds = texts.ConvertAll(t => managed.Encode(t, addSpecialTokens: false));
        double managedCold = sw.Elapsed.TotalSeconds;
        double nativeCold = 0;
        int identical = 0;
        if (native is not null)
        {
            sw.Restart();
            var nativeIds = texts.ConvertAll(t => native.Encode(t, addSpecialTokens: false));
            nativeCold = sw.Elapsed.TotalSeconds;
            identical = managedIds.Zip(nativeIds).Count(p => p.First.AsSpan().SequenceEqual(p.Second));
        }
        long tokens = managedIds.Sum(ids => (long)ids.Length);
        long chars = texts.Sum(t => (long)t.Length);
        log($"{texts.Count} texts, {chars:N0} characters, {tokens:N0} tokens" + (native is null ? "" : $"; identical ids on {identical}/{texts.Count} texts"));

        var managedRuns = new List<double>();
        var nativeRuns = new List<double>();
        for (int r = 0; r < o.Repeats; r++)
        {
            managedRuns.Add(Pass(managed, texts));
            if (native is not null)
                nativeRuns.Add(Pass(native, texts));
            log($"run {r + 1}: managed {managedRuns[^1]:F3} s" + (native is null ? "" : $", native {nativeRuns[^1]:F3} s"));
        }
        Side Make(string name, List<double> runs, double cold) => new(name, BenchStatistics.Median(runs), tokens / BenchStatistics.Median(runs), cold, runs);
        return new Result(texts.Count, chars, tokens, Make("managed", managedRuns, managedCold),
            native is null ? null : Make("native", nativeRuns, nativeCold), identical);
    }

    private static double Pass(HfTokenizer tokenizer, List<string> texts)
    {
        var sw = Stopwatch.StartNew();
        long n = 0;
        foreach (var t in texts)
            n += tokenizer.Encode(t, addSpecialTokens: false).Length;
        GC.KeepAlive(n);
        return sw.Elapsed.TotalSeconds;
    }

    /// <summary>The texts of the given files and folders, in a stable order.</summary>
    public static List<string> ReadTexts(IEnumerable<string> paths)
    {
        var files = new List<string>();
        foreach (var p in paths)
        {
            if (File.Exists(p))
                files.Add(p);
            else if (Directory.Exists(p))
            {
                files.AddRange(Directory.EnumerateFiles(p, "*", SearchOption.AllDirectories)
                    .Where(f => Path.GetExtension(f) is ".jsonl" or ".md" or ".txt" or ".cs")
                    .Where(f => !f.Split(Path.DirectorySeparatorChar).Any(part => part is "bin" or "obj" or ".git"))
                    .Order(StringComparer.Ordinal));
            }
            else
                throw new FileNotFoundException($"--text {p}: no such file or folder", p);
        }
        var texts = new List<string>();
        foreach (var f in files)
        {
            if (Path.GetExtension(f) == ".jsonl")
            {
                foreach (var line in File.ReadLines(f))
                {
                    if (line.Length == 0)
                        continue;
                    using var doc = JsonDocument.Parse(line);
                    Strings(doc.RootElement, texts);
                }
            }
            else
                Chunks(File.ReadAllText(f), texts);
        }
        return texts;
    }

    private static void Strings(JsonElement e, List<string> output)
    {
        switch (e.ValueKind)
        {
            case JsonValueKind.String when e.GetString() is { Length: > 0 } s: output.Add(s); break;
            case JsonValueKind.Object: foreach (var p in e.EnumerateObject()) Strings(p.Value, output); break;
            case JsonValueKind.Array: foreach (var x in e.EnumerateArray()) Strings(x, output); break;
        }
    }

    private static void Chunks(string text, List<string> output)
    {
        int start = 0;
        while (start < text.Length)
        {
            int end = Math.Min(text.Length, start + 2000);
            if (end < text.Length && text.IndexOf('\n', end) is var nl and >= 0)
                end = nl + 1;
            else if (end < text.Length)
                end = text.Length;
            output.Add(text[start..end]);
            start = end;
        }
    }
}
