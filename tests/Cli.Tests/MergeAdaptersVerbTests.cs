using System.Text.Json.Nodes;
using QLora.Quant;

namespace QLora.Cli.Tests;

public class MergeAdaptersVerbTests
{
    const string Q = "model.layers.0.self_attn.q_proj", V = "model.layers.1.self_attn.v_proj";

    // A PEFT adapter on two modules of TinyHfFolder's model (q_proj [64, 64], v_proj [32, 64]), float32, random values.
    static string Adapter(string dir, int rank, int seed, double alpha = 8)
    {
        Directory.CreateDirectory(dir);
        var rng = new Random(seed);
        byte[] Values(long n)
        {
            var f = new float[n];
            for (int i = 0; i < n; i++) f[i] = (float)(rng.NextDouble() - 0.5) * 0.2f;
            var b = new byte[n * 4];
            Buffer.BlockCopy(f, 0, b, 0, b.Length);
            return b;
        }
        var tensors = new List<(string, TensorDType, long[], byte[])>();
        foreach (var (module, outDim) in new[] { (Q, 64L), (V, 32L) })
        {
            tensors.Add(($"base_model.model.{module}.lora_A.weight", TensorDType.F32, [rank, 64], Values(rank * 64)));
            tensors.Add(($"base_model.model.{module}.lora_B.weight", TensorDType.F32, [outDim, rank], Values(outDim * rank)));
        }
        SafetensorsWriter.WriteFile(Path.Combine(dir, "adapter_model.safetensors"), tensors);
        File.WriteAllText(Path.Combine(dir, "adapter_config.json"), new JsonObject
        {
            ["peft_type"] = "LORA", ["r"] = rank, ["lora_alpha"] = alpha, ["target_modules"] = new JsonArray(Q, V), ["bias"] = "none",
        }.ToJsonString());
        return dir;
    }

    [Fact]
    public void MergedAdaptersAreAPeftAdapterThatQloraMergeTakes()
    {
        using var tmp = new TempDir();
        TinyHfFolder.Write(tmp["base"]);
        string a = Adapter(tmp["a"], 4, 1), b = Adapter(tmp["b"], 4, 2, alpha: 16);
        var r = CliRunner.Run("merge-adapters", "--adapter", a, "--adapter", b, "--weights", "0.7,-0.3", "--combination", "ties",
            "--density", "0.5", "--majority-sign-method", "frequency", "--base", tmp["base"], "--output", tmp["ties"]);
        Assert.True(r.ExitCode == 0, r.Stderr + r.Stdout);
        var json = JsonNode.Parse(r.LastLine)!;
        Assert.Equal("ties", json["combination"]!.GetValue<string>());
        Assert.Equal(4, json["r"]!.GetValue<int>());
        Assert.Equal(2, json["modules"]!.GetValue<int>());
        Assert.Equal([0.7, -0.3], json["weights"]!.AsArray().Select(n => n!.GetValue<double>()));
        Assert.Equal(["adapter_config.json", "adapter_model.safetensors"], Directory.GetFiles(tmp["ties"]).Select(Path.GetFileName).Order());

        // A negative first weight is written with '='; DARE's seed is reported.
        r = CliRunner.Run("merge-adapters", "--adapter", a, "--adapter", b, "--weights=-1,1", "--combination", "dare_linear", "--density", "0.3",
            "--seed", "5", "--output", tmp["dare"]);
        Assert.True(r.ExitCode == 0, r.Stderr + r.Stdout);
        Assert.Equal(5UL, JsonNode.Parse(r.LastLine)!["seed"]!.GetValue<ulong>());

        r = CliRunner.Run("merge-adapters", "--adapter", a, "--adapter", b, "--weights", "0.5,0.5", "--combination", "cat", "--output", tmp["cat"]);
        Assert.True(r.ExitCode == 0, r.Stderr + r.Stdout);
        Assert.Equal(8, JsonNode.Parse(r.LastLine)!["r"]!.GetValue<int>());
        var merge = CliRunner.Run("merge", "--base", tmp["base"], "--adapter", tmp["cat"], "--output", tmp["merged"]);
        Assert.True(merge.ExitCode == 0, merge.Stderr + merge.Stdout);
        Assert.Contains("2 projections merged", merge.Stdout);
    }

    [Theory]
    [InlineData("--weights", "1", "--combination", "cat")] // one weight for two adapters
    [InlineData("--weights", "1,x", "--combination", "cat")]
    [InlineData("--weights", "1,1", "--combination", "ties", "--density", "1.5")]
    [InlineData("--weights", "1,1", "--combination", "ties", "--density", "0")]
    [InlineData("--weights", "1,1", "--combination", "ties")] // no density
    [InlineData("--weights", "1,1", "--combination", "linear", "--density", "0.5")] // linear does not prune
    [InlineData("--weights", "1,1", "--combination", "cat", "--svd-rank", "4")]
    [InlineData("--weights", "1,1", "--combination", "dare_linear", "--density", "0.5", "--majority-sign-method", "total")]
    [InlineData("--weights", "1,1", "--combination", "average")]
    public void UnusableSettingsAreAUsageErrorOfOneLine(params string[] settings)
    {
        using var tmp = new TempDir();
        string a = Adapter(tmp["a"], 4, 1), b = Adapter(tmp["b"], 4, 2);
        var r = CliRunner.Run(["merge-adapters", "--adapter", a, "--adapter", b, .. settings, "--output", tmp["out"]]);
        Assert.Equal(2, r.ExitCode);
        Assert.Single(r.Stderr.TrimEnd().Split('\n'));
        Assert.StartsWith("qlora merge-adapters: ", r.Stderr);
        Assert.False(Directory.Exists(tmp["out"]));
    }

    [Fact]
    public void BadInputsGiveOneLineAndChangeNothing()
    {
        using var tmp = new TempDir();
        string a = Adapter(tmp["a"], 4, 1), b = Adapter(tmp["b"], 8, 2);
        var r = CliRunner.Run("merge-adapters", "--adapter", a, "--adapter", tmp["missing"], "--weights", "1,1", "--combination", "cat", "--output", tmp["out"]);
        Assert.Equal(1, r.ExitCode);
        Assert.Equal($"qlora merge-adapters: --adapter {tmp["missing"]} does not exist; a PEFT adapter folder is expected", r.Stderr.TrimEnd());

        r = CliRunner.Run("merge-adapters", "--adapter", a, "--adapter", b, "--weights", "1,1", "--combination", "linear", "--output", tmp["out"]);
        Assert.Equal(1, r.ExitCode);
        Assert.Single(r.Stderr.TrimEnd().Split('\n'));
        Assert.Contains("same rank", r.Stderr);
        Assert.Contains("use cat or svd", r.Stderr);
        Assert.False(Directory.Exists(tmp["out"]));

        var before = File.ReadAllBytes(Path.Combine(a, "adapter_model.safetensors"));
        r = CliRunner.Run("merge-adapters", "--adapter", a, "--adapter", b, "--weights", "1,1", "--combination", "cat", "--output", Path.Combine(a, "merged"), "--overwrite");
        Assert.Equal(1, r.ExitCode);
        Assert.Contains("lies inside --adapter", r.Stderr);
        Assert.Single(r.Stderr.TrimEnd().Split('\n'));
        Assert.Equal(before, File.ReadAllBytes(Path.Combine(a, "adapter_model.safetensors")));
        Assert.Equal(["adapter_config.json", "adapter_model.safetensors"], Directory.GetFileSystemEntries(a).Select(Path.GetFileName).Order());

        // The base is checked too: an adapter whose shapes do not fit it is refused, naming the tensor.
        TinyHfFolder.Write(tmp["base"]);
        string wrong = Adapter(tmp["wrong"], 4, 3);
        var json = JsonNode.Parse(File.ReadAllText(Path.Combine(wrong, "adapter_config.json")))!.AsObject();
        json["r"] = 2;
        File.WriteAllText(Path.Combine(wrong, "adapter_config.json"), json.ToJsonString());
        r = CliRunner.Run("merge-adapters", "--adapter", a, "--adapter", wrong, "--weights", "1,1", "--combination", "cat", "--base", tmp["base"], "--output", tmp["out"]);
        Assert.Equal(1, r.ExitCode);
        Assert.Contains("r = 2", r.Stderr);
        Assert.False(Directory.Exists(tmp["out"]));
    }
}
