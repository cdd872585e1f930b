using System.Text.Json.Nodes;
using QLora.Quant.Gguf;

namespace QLora.Cli.Tests;

public class ExportVerbTests
{
    static string TinyBase()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "QLora.sln"))) dir = dir.Parent;
        return Path.Combine(dir?.FullName ?? throw new InvalidOperationException("QLora.sln not found"), "models", "tiny-llama-base");
    }

    [Fact]
    public void ExportWritesOneGgufFileAndEndsWithAJsonLine()
    {
        using var tmp = new TempDir();
        var r = CliRunner.Run("export", "gguf", "--base", TinyBase(), "--output", tmp["m.gguf"], "--type", "q8_0");
        Assert.True(r.ExitCode == 0, r.Stderr + r.Stdout);
        var json = JsonNode.Parse(r.LastLine)!;
        Assert.Equal("q8_0", json["type"]!.GetValue<string>());
        Assert.Equal(39, json["tensors"]!.GetValue<int>());
        Assert.Equal(new FileInfo(tmp["m.gguf"]).Length, json["bytes"]!.GetValue<long>());
        using var g = GgufReader.Open(tmp["m.gguf"]);
        Assert.Equal(7L, g.MetadataByKey["general.file_type"].AsInt64());
        Assert.Single(Directory.GetFiles(tmp.Path)); // no temporary left behind

        var inspect = CliRunner.Run("inspect", tmp["m.gguf"]);
        Assert.True(inspect.ExitCode == 0, inspect.Stderr);
        Assert.Contains("general.architecture = llama", inspect.Stdout);
        Assert.Contains("tokenizer.ggml.tokens = [259 × String]", inspect.Stdout);
        Assert.Matches(@"blk\.0\.attn_q\.weight\s+q8_0\s+\[256, 256\]", inspect.Stdout);
        Assert.StartsWith("39 tensors", inspect.LastLine);
        File.WriteAllText(tmp["bad.gguf"], "GGML");
        inspect = CliRunner.Run("inspect", tmp["bad.gguf"]);
        Assert.Equal(1, inspect.ExitCode);
        Assert.Contains("bad.gguf: ", inspect.Stderr);
    }

    [Fact]
    public void AnExistingOutputIsRefusedUnlessOverwriteAndTheInputIsNeverReplaced()
    {
        using var tmp = new TempDir();
        File.WriteAllText(tmp["m.gguf"], "keep");
        var r = CliRunner.Run("export", "gguf", "--base", TinyBase(), "--output", tmp["m.gguf"]);
        Assert.Equal(1, r.ExitCode);
        Assert.Equal("keep", File.ReadAllText(tmp["m.gguf"]));
        Assert.StartsWith("qlora export gguf: ", r.Stderr);
        Assert.Contains("--overwrite", r.Stderr);
        Assert.Single(r.Stderr.TrimEnd().Split('\n'));

        // An output that is one of the input files is refused even with --overwrite.
        var copy = Directory.CreateDirectory(tmp["base"]).FullName;
        foreach (var f in Directory.GetFiles(TinyBase())) File.Copy(f, Path.Combine(copy, Path.GetFileName(f)));
        var weights = Path.Combine(copy, "model.safetensors");
        var before = File.ReadAllBytes(weights);
        r = CliRunner.Run("export", "gguf", "--base", copy, "--output", weights, "--overwrite");
        Assert.Equal(1, r.ExitCode);
        Assert.Contains("input folder", r.Stderr);
        Assert.Equal(before, File.ReadAllBytes(weights));
    }

    [Fact]
    public void BadArgumentsGiveOneLine()
    {
        using var tmp = new TempDir();
        var r = CliRunner.Run("export", "gguf", "--base", TinyBase(), "--output", tmp["m.gguf"], "--type", "q3_k");
        Assert.Equal(2, r.ExitCode);
        Assert.Single(r.Stderr.TrimEnd().Split('\n'));
        Assert.Contains("q4_k_m", r.Stderr);
        r = CliRunner.Run("export", "gguf", "--base", TinyBase(), "--adapter", tmp["none"], "--output", tmp["m.gguf"]);
        Assert.Equal(1, r.ExitCode);
        Assert.Equal($"qlora export gguf: --adapter {tmp["none"]}: no such folder", r.Stderr.TrimEnd());
        Assert.False(File.Exists(tmp["m.gguf"]));
    }
}
