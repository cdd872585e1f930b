using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using QLora.Quant;

namespace QLora.Cli.Tests;

public class QuantizeVerbTests
{
    /// <summary>Reads a safetensors header straight from the bytes, independently of the project's reader.</summary>
    private static JsonObject RawHeader(string file)
    {
        var bytes = File.ReadAllBytes(file);
        long len = BinaryPrimitives.ReadInt64LittleEndian(bytes);
        return JsonNode.Parse(Encoding.UTF8.GetString(bytes, 8, (int)len))!.AsObject();
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void QuantizesAFolderIntoTheBnbLayoutAndDequantizesBack(bool sharded)
    {
        using var tmp = new TempDir();
        var original = TinyHfFolder.Write(tmp["model"], sharded);
        var r = CliRunner.Run("quantize", "--input", tmp["model"], "--output", tmp["q"]);
        Assert.True(r.ExitCode == 0, r.Stderr);
        var summary = JsonNode.Parse(r.LastLine)!;
        Assert.Equal(14, summary["quantized_tensors"]!.GetValue<int>());
        Assert.Equal(7, summary["copied_tensors"]!.GetValue<int>());

        // config.json carries the transformers quantization_config; tokenizer files are copied.
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(tmp["q"], "config.json")))!;
        Assert.Equal("bitsandbytes", config["quantization_config"]!["quant_method"]!.GetValue<string>());
        Assert.Equal("nf4", config["quantization_config"]!["bnb_4bit_quant_type"]!.GetValue<string>());
        Assert.True(config["quantization_config"]!["bnb_4bit_use_double_quant"]!.GetValue<bool>());
        Assert.Equal(64, config["hidden_size"]!.GetValue<int>());
        Assert.True(File.Exists(Path.Combine(tmp["q"], "tokenizer.json")));
        Assert.True(File.Exists(Path.Combine(tmp["q"], "tokenizer_config.json")));

        // The raw headers hold the bnb keys with the spec's dtypes and shapes.
        var files = Directory.GetFiles(tmp["q"], "*.safetensors");
        Assert.Equal(sharded ? 2 : 1, files.Length);
        var all = new Dictionary<string, JsonNode>();
        foreach (var f in files)
            foreach (var kv in RawHeader(f)) if (kv.Key != "__metadata__") all[kv.Key] = kv.Value!;
        const string P = "model.layers.1.mlp.down_proj.weight";
        Assert.Equal("U8", all[P]["dtype"]!.GetValue<string>());
        Assert.Equal("[4096,1]", all[P]["shape"]!.ToJsonString());
        Assert.Equal("U8", all[P + ".absmax"]!["dtype"]!.GetValue<string>());
        Assert.Equal("[128]", all[P + ".absmax"]!["shape"]!.ToJsonString());
        Assert.Equal("[1]", all[P + ".nested_absmax"]!["shape"]!.ToJsonString());
        Assert.Equal("[256]", all[P + ".nested_quant_map"]!["shape"]!.ToJsonString());
        Assert.True(all.ContainsKey(P + ".quant_state.bitsandbytes__nf4"));
        Assert.Equal("BF16", all["model.embed_tokens.weight"]["dtype"]!.GetValue<string>());
        if (sharded)
        {
            var index = JsonNode.Parse(File.ReadAllText(Path.Combine(tmp["q"], "model.safetensors.index.json")))!;
            var map = index["weight_map"]!.AsObject();
            Assert.Equal(all.Count, map.Count);
            Assert.Equal(map[P]!.GetValue<string>(), map[P + ".nested_absmax"]!.GetValue<string>());
        }

        // Dequantize each output file; weights come back in their recorded dtype, others bit for bit.
        foreach (var f in files)
        {
            var back = tmp[Path.GetFileName(f) + ".dense"];
            var d = CliRunner.Run("dequantize", "--input", f, "--output", back);
            Assert.True(d.ExitCode == 0, d.Stderr);
            using var reader = SafetensorsReader.Open(back);
            using var quantized = SafetensorsReader.Open(f);
            foreach (var t in reader.Tensors)
            {
                var (dtype, shape, data) = original[t.Name];
                Assert.Equal(dtype, t.DType);
                Assert.Equal(shape, t.Shape);
                var bytes = reader.ReadBytes(t.Name);
                if (!t.Name.EndsWith("_proj.weight")) { Assert.Equal(data, bytes); continue; }
                // Exactly the reference dequantization of the stored codes ...
                var q = BnbCheckpointLayout.Read(quantized, t.Name);
                var expected = new byte[bytes.Length];
                FourBitReferenceDequantizer.Dequantize(q, FloatTypes.FromTensorDType(dtype)!.Value, expected);
                Assert.Equal(expected, bytes);
                // ... and close to the original weights.
                var a = new float[t.ElementCount];
                var b = new float[t.ElementCount];
                FloatTypes.ToFloat32(data, FloatTypes.FromTensorDType(dtype)!.Value, a);
                FloatTypes.ToFloat32(bytes, FloatTypes.FromTensorDType(dtype)!.Value, b);
                double err = a.Zip(b, (x, y) => Math.Abs(x - y)).Average() / a.Select(Math.Abs).Average();
                Assert.True(err < 0.2, $"{t.Name}: relative error {err}");
            }
        }
    }

    [Fact]
    public void QuantizesASingleFileWithOptionsAndAnIncludePattern()
    {
        using var tmp = new TempDir();
        TinyHfFolder.Write(tmp["model"]);
        var r = CliRunner.Run("quantize", "--input", Path.Combine(tmp["model"], "model.safetensors"), "--output", tmp["q.safetensors"],
            "--quant-type", "fp4", "--blocksize", "128", "--double-quant", "false", "--include", @"mlp\.up_proj\.weight$");
        Assert.True(r.ExitCode == 0, r.Stderr);
        var header = RawHeader(tmp["q.safetensors"]);
        Assert.True(header.ContainsKey("model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__fp4"));
        Assert.False(header.ContainsKey("model.layers.0.mlp.gate_proj.weight.absmax"));
        Assert.Equal("F32", header["model.layers.0.mlp.up_proj.weight.absmax"]!["dtype"]!.GetValue<string>());
        Assert.False(header.ContainsKey("model.layers.0.mlp.up_proj.weight.nested_absmax"));
        var stateInfo = header["model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__fp4"]!;
        long[] range = stateInfo["data_offsets"]!.AsArray().Select(x => x!.GetValue<long>()).ToArray();
        var bytes = File.ReadAllBytes(tmp["q.safetensors"]);
        long start = 8 + BinaryPrimitives.ReadInt64LittleEndian(bytes);
        Assert.Equal("{\"quant_type\": \"fp4\", \"blocksize\": 128, \"dtype\": \"bfloat16\", \"shape\": [128, 64]}",
            Encoding.UTF8.GetString(bytes, (int)(start + range[0]), (int)(range[1] - range[0])));
        Assert.Equal("pt", header["__metadata__"]!["format"]!.GetValue<string>());
    }

    [Fact]
    public void InspectShowsBitsPerWeight()
    {
        using var tmp = new TempDir();
        TinyHfFolder.Write(tmp["model"]);
        Assert.Equal(0, CliRunner.Run("quantize", "--input", tmp["model"], "--output", tmp["q"]).ExitCode);
        var r = CliRunner.Run("inspect", tmp["q"]);
        Assert.True(r.ExitCode == 0, r.Stderr);
        Assert.Contains("model.layers.0.self_attn.q_proj.weight", r.Stdout);
        Assert.Contains("nf4 bs64 dq from bfloat16", r.Stdout);
        Assert.DoesNotContain(".nested_absmax", r.Stdout);
        // Expected storage from the raw header: every tensor belonging to a quantized weight.
        var header = RawHeader(Path.Combine(tmp["q"], "model.safetensors"));
        var weights = header.Select(kv => kv.Key).Where(k => k.EndsWith("_proj.weight")).ToList();
        long bytes = header.Where(kv => weights.Any(w => kv.Key == w || kv.Key.StartsWith(w + ".")))
            .Sum(kv => kv.Value!["data_offsets"]![1]!.GetValue<long>() - kv.Value!["data_offsets"]![0]!.GetValue<long>());
        Assert.Contains($"4-bit weights: 73,728 parameters in {bytes:N0} bytes = {8.0 * bytes / 73728:F3} bits per weight", r.Stdout);
    }

    [Fact]
    public void BadInputGetsOneLineOnStderrAndANonZeroExit()
    {
        using var tmp = new TempDir();
        TinyHfFolder.Write(tmp["model"]);
        var missing = CliRunner.Run("quantize", "--input", tmp["nope"], "--output", tmp["q"]);
        Assert.NotEqual(0, missing.ExitCode);
        Assert.Contains(tmp["nope"], missing.Stderr);
        Assert.Single(missing.Stderr.TrimEnd().Split('\n'));

        var badBlock = CliRunner.Run("quantize", "--input", tmp["model"], "--output", tmp["q"], "--blocksize", "48");
        Assert.NotEqual(0, badBlock.ExitCode);
        Assert.Contains("--blocksize", badBlock.Stderr);
        Assert.Single(badBlock.Stderr.TrimEnd().Split('\n'));

        var badType = CliRunner.Run("quantize", "--input", tmp["model"], "--output", tmp["q"], "--quant-type", "int4");
        Assert.NotEqual(0, badType.ExitCode);
        Assert.Contains("int4", badType.Stderr);

        var badRegex = CliRunner.Run("quantize", "--input", tmp["model"], "--output", tmp["q"], "--include", "(unclosed");
        Assert.NotEqual(0, badRegex.ExitCode);
        Assert.Contains("--include", badRegex.Stderr);

        var corrupt = tmp["corrupt.safetensors"];
        File.WriteAllBytes(corrupt, [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F, (byte)'{']);
        var c = CliRunner.Run("quantize", "--input", corrupt, "--output", tmp["c.safetensors"]);
        Assert.Equal(1, c.ExitCode);
        Assert.Contains(corrupt, c.Stderr);
        Assert.Single(c.Stderr.TrimEnd().Split('\n'));
        Assert.False(File.Exists(tmp["c.safetensors"]));

        Assert.Equal(0, CliRunner.Run("quantize", "--input", tmp["model"], "--output", tmp["q"]).ExitCode);
        var again = CliRunner.Run("quantize", "--input", tmp["model"], "--output", tmp["q"]);
        Assert.Equal(1, again.ExitCode);
        Assert.Contains("--overwrite", again.Stderr);
        Assert.Equal(0, CliRunner.Run("quantize", "--input", tmp["model"], "--output", tmp["q"], "--overwrite").ExitCode);

        var quantizedAgain = CliRunner.Run("quantize", "--input", tmp["q"], "--output", tmp["qq"]);
        Assert.Equal(1, quantizedAgain.ExitCode);
        Assert.Contains("already quantized", quantizedAgain.Stderr);

        var unknownVerb = CliRunner.Run("frobnicate");
        Assert.Equal(2, unknownVerb.ExitCode);
    }

    [Fact]
    public void AJobFileSuppliesDefaultsAndTheCommandLineOverridesThem()
    {
        using var tmp = new TempDir();
        TinyHfFolder.Write(tmp["model"]);
        File.WriteAllText(tmp["job.json"], """
            { "Quantize": { "Input": "model", "Output": "from-job", "QuantType": "fp4", "Blocksize": 128, "DoubleQuant": false } }
            """);
        var r = CliRunner.Run("quantize", "--config", tmp["job.json"], "--blocksize", "256");
        Assert.True(r.ExitCode == 0, r.Stderr);
        var json = System.Text.Json.Nodes.JsonNode.Parse(r.LastLine)!;
        Assert.Equal("fp4", json["quant_type"]!.GetValue<string>());
        Assert.Equal(256, json["blocksize"]!.GetValue<int>());
        Assert.False(json["double_quant"]!.GetValue<bool>());
        Assert.True(File.Exists(Path.Combine(tmp["from-job"], "model.safetensors"))); // relative to the job file

        File.WriteAllText(tmp["bad.json"], """{ "Quantize": { "Input": "model", "Blocksise": 128 } }""");
        var unknown = CliRunner.Run("quantize", "--config", tmp["bad.json"]);
        Assert.Equal(1, unknown.ExitCode);
        Assert.Contains("Quantize:Blocksise", unknown.Stderr);
        Assert.Contains("Blocksize", unknown.Stderr);

        File.WriteAllText(tmp["type.json"], """{ "Quantize": { "Input": "model", "Output": "x", "Blocksize": "big" } }""");
        var wrongType = CliRunner.Run("quantize", "--config", tmp["type.json"]);
        Assert.Equal(1, wrongType.ExitCode);
        Assert.Contains("Blocksize", wrongType.Stderr);
        Assert.Single(wrongType.Stderr.TrimEnd().Split('\n'));

        var missing = CliRunner.Run("quantize", "--config", tmp["nope.json"]);
        Assert.Equal(1, missing.ExitCode);
        Assert.Contains("nope.json", missing.Stderr);
    }

    [Fact]
    public void BenchDequantEndsWithAJsonLineOfItsFigures()
    {
        var r = CliRunner.Run("bench", "dequant", "--weights", "1048576", "--repeats", "1");
        Assert.True(r.ExitCode == 0, r.Stderr);
        var json = JsonNode.Parse(r.LastLine)!;
        Assert.Equal("dequant", json["bench"]!.GetValue<string>());
        Assert.Equal(1048576, json["weights"]!.GetValue<long>());
        foreach (var key in new[] { "dequant_gbps", "copy_gbps", "ratio" }) Assert.True(json[key]!.GetValue<double>() > 0, key);
    }

    [Fact]
    public void BenchTrainEndsWithAJsonLineOfItsFigures()
    {
        var r = CliRunner.Run("bench", "train", "--layers", "1", "--hidden", "64", "--intermediate", "128", "--heads", "4",
            "--kv-heads", "2", "--vocab", "100", "--seq", "16", "--steps", "1", "--rank", "4");
        Assert.True(r.ExitCode == 0, r.Stderr);
        var json = JsonNode.Parse(r.LastLine)!;
        Assert.Equal("train", json["bench"]!.GetValue<string>());
        Assert.Equal(16, json["tokens_per_step"]!.GetValue<int>());
        foreach (var key in new[] { "params", "tokens_per_s", "matmul_gflops", "mfu", "dequant_overhead" })
            Assert.True(json[key]!.GetValue<double>() > 0, key);
        var bad = CliRunner.Run("bench", "train", "--heads", "5");
        Assert.Equal(1, bad.ExitCode);
        Assert.Single(bad.Stderr.TrimEnd().Split('\n'));
    }

    [Fact]
    public void MergeWritesAStandaloneFolderAndReportsBadInputInOneLine()
    {
        using var tmp = new TempDir();
        TinyHfFolder.Write(tmp["model"]);
        using (var m = QLora.Trainer.HfModelLoader.Load(tmp["model"], new QLora.Trainer.HfModelLoader.Options { Quantize = false }))
        {
            var o = new QLora.Trainer.LoraOptions { Rank = 2 };
            m.ApplyLora(o);
            QLora.Trainer.PeftAdapter.Save(m, o, tmp["adapter"]);
        }
        var r = CliRunner.Run("merge", "--base", tmp["model"], "--adapter", tmp["adapter"], "--output", tmp["merged"], "--dtype", "float16");
        Assert.True(r.ExitCode == 0, r.Stderr);
        Assert.Contains("14 projections merged", r.Stdout);
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(tmp["merged"], "config.json")))!;
        Assert.Equal("float16", config["torch_dtype"]!.GetValue<string>());
        Assert.True(File.Exists(Path.Combine(tmp["merged"], "tokenizer.json")));
        var bad = CliRunner.Run("merge", "--base", tmp["model"], "--adapter", tmp["nope"], "--output", tmp["x"]);
        Assert.Equal(1, bad.ExitCode);
        Assert.Contains("--adapter", bad.Stderr);
        Assert.Single(bad.Stderr.TrimEnd().Split('\n'));
    }

    [Fact]
    public void GenerateDecodesNewTokensWithTheFoldersTokenizer()
    {
        using var tmp = new TempDir();
        TinyHfFolder.Write(tmp["model"]);
        // A real (word-level) tokenizer.json for the Hugging Face tokenizers library.
        var words = new[] { "<unk>", "<s>", "</s>", "hello", "world", "the", "cat", "sat" };
        var vocab = new JsonObject();
        for (int i = 0; i < words.Length; i++) vocab[words[i]] = i;
        var added = new JsonArray();
        for (int i = 0; i < 3; i++)
            added.Add(new JsonObject { ["id"] = i, ["content"] = words[i], ["single_word"] = false, ["lstrip"] = false, ["rstrip"] = false, ["normalized"] = false, ["special"] = true });
        var tokenizer = new JsonObject
        {
            ["version"] = "1.0", ["truncation"] = null, ["padding"] = null, ["added_tokens"] = added, ["normalizer"] = null,
            ["pre_tokenizer"] = new JsonObject { ["type"] = "Whitespace" }, ["post_processor"] = null, ["decoder"] = null,
            ["model"] = new JsonObject { ["type"] = "WordLevel", ["vocab"] = vocab, ["unk_token"] = "<unk>" },
        };
        File.WriteAllText(Path.Combine(tmp["model"], "tokenizer.json"), tokenizer.ToJsonString());
        var r = CliRunner.Run("generate", "--model", tmp["model"], "--prompt", "hello world", "--max-new-tokens", "5");
        Assert.True(r.ExitCode == 0, r.Stderr);
        var json = JsonNode.Parse(r.LastLine)!;
        Assert.Equal("generate", json["verb"]!.GetValue<string>());
        Assert.Equal(2, json["prompt_tokens"]!.GetValue<int>());
        Assert.Equal(5, json["new_tokens"]!.GetValue<int>());
        var bad = CliRunner.Run("generate", "--model", tmp["model"], "--prompt", "x", "--top-p", "0");
        Assert.Equal(1, bad.ExitCode);
        Assert.Contains("top-p", bad.Stderr);
    }
}
