using System.Text.Json.Nodes;
using QLora.Quant;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

/// <summary>
/// Gemma 2 and Gemma 3 text models from folders in the transformers layout, against a float64 forward written from
/// transformers' modeling_gemma2 / modeling_gemma3; then the QLoRA path (train, PEFT save, merge, generate) on Gemma 2.
/// </summary>
public class GemmaModelTests
{
    // Tiny shapes in the real layout: head_dim 16 ≠ hidden / heads, tied embeddings, two layers (one sliding, one global).
    private static JsonObject ConfigJson(bool gemma3, int window)
    {
        var c = new JsonObject
        {
            ["architectures"] = new JsonArray(gemma3 ? "Gemma3ForCausalLM" : "Gemma2ForCausalLM"), ["model_type"] = gemma3 ? "gemma3_text" : "gemma2",
            ["hidden_size"] = 32, ["intermediate_size"] = 64, ["num_hidden_layers"] = 2, ["num_attention_heads"] = 4, ["num_key_value_heads"] = 2,
            ["head_dim"] = 16, ["vocab_size"] = 64, ["rms_norm_eps"] = 1e-6, ["hidden_activation"] = "gelu_pytorch_tanh",
            ["query_pre_attn_scalar"] = 12.0, ["sliding_window"] = window, ["max_position_embeddings"] = 128, ["torch_dtype"] = "float32",
        };
        if (gemma3)
        {
            c["rope_theta"] = 10000.0;
            c["rope_local_base_freq"] = 100.0;
            c["rope_scaling"] = new JsonObject { ["rope_type"] = "linear", ["factor"] = 4.0 };
            c["sliding_window_pattern"] = 2;
        }
        else
        {
            c["rope_theta"] = 10000.0;
            c["attn_logit_softcapping"] = 0.5; // small caps so tanh bends the tiny model's scores and logits
            c["final_logit_softcapping"] = 0.3;
        }
        return c;
    }

    private static Dictionary<string, Tensor> WriteFolder(string dir, JsonObject configJson, int seed = 9)
    {
        Directory.CreateDirectory(dir);
        var c = LlamaConfig.FromJson(configJson);
        var w = new Dictionary<string, Tensor>();
        using (var probe = LlamaForCausalLM.CreateRandom(c, seed, quantize: false, computeDType: ScalarType.Float32, initStd: 0.1))
            foreach (var (name, p) in probe.named_parameters()) w[name] = p.detach().clone();
        var gen = new Generator((ulong)seed + 1);
        foreach (var k in w.Keys.Where(k => k.EndsWith("norm.weight", StringComparison.Ordinal)).ToList())
            w[k] = 0.3 * randn(w[k].shape, generator: gen); // Gemma norms scale by (1 + weight): weights near zero, as trained ones are
        Assert.False(w.ContainsKey("lm_head.weight")); // tied
        SafetensorsWriter.WriteFile(Path.Combine(dir, "model.safetensors"),
            w.Select(kv => (kv.Key, TensorDType.F32, kv.Value.shape, kv.Value.contiguous().bytes.ToArray())), new Dictionary<string, string> { ["format"] = "pt" });
        File.WriteAllText(Path.Combine(dir, "config.json"), configJson.ToJsonString());
        return w;
    }

    /// <summary>Float64 forward after transformers' Gemma2Model / Gemma3TextModel (eager attention).</summary>
    private static Tensor Reference(JsonObject cj, Dictionary<string, Tensor> w, long[] ids)
    {
        using var scope = NewDisposeScope();
        bool gemma3 = cj["architectures"]![0]!.GetValue<string>() == "Gemma3ForCausalLM";
        int T = ids.Length, H = 32, hd = 16, nh = 4, nkv = 2, window = cj["sliding_window"]!.GetValue<int>();
        double eps = 1e-6, qpas = 12;
        double? attnCap = cj["attn_logit_softcapping"]?.GetValue<double>(), finalCap = cj["final_logit_softcapping"]?.GetValue<double>();
        Tensor W(string n) => w[n].to(ScalarType.Float64);
        Tensor Norm(Tensor x, string n) => x * (x.pow(2).mean([-1L], keepdim: true) + eps).rsqrt() * (1 + W(n));
        Tensor Lin(Tensor x, string n) => x.matmul(W(n).t());
        Tensor GeluTanh(Tensor x) => 0.5 * x * (1 + (Math.Sqrt(2 / Math.PI) * (x + 0.044715 * x.pow(3))).tanh());
        Tensor RotateHalf(Tensor x) => cat([-x[.., .., (hd / 2)..], x[.., .., ..(hd / 2)]], -1);
        (Tensor Cos, Tensor Sin) Rope(double theta, double factor)
        {
            var inv = 1.0 / pow(theta, arange(0, hd, 2, dtype: ScalarType.Float64) / hd) / factor;
            var f = arange(T, dtype: ScalarType.Float64).unsqueeze(1) * inv.unsqueeze(0);
            var emb = cat([f, f], -1);
            return (emb.cos().unsqueeze(1), emb.sin().unsqueeze(1));
        }
        var i = arange(T).unsqueeze(1);
        var j = arange(T).unsqueeze(0);
        var h = W("model.embed_tokens.weight").index_select(0, tensor(ids)) * Math.Sqrt(H);
        for (int l = 0; l < 2; l++)
        {
            string p = $"model.layers.{l}.";
            bool sliding = l == 0; // Gemma 2: even layers; Gemma 3 with pattern 2: all but every second
            var (cos, sin) = gemma3 ? (sliding ? Rope(100, 1) : Rope(10000, 4)) : Rope(10000, 1);
            var x = Norm(h, p + "input_layernorm.weight");
            var q = Lin(x, p + "self_attn.q_proj.weight").view(T, nh, hd);
            var k = Lin(x, p + "self_attn.k_proj.weight").view(T, nkv, hd);
            var v = Lin(x, p + "self_attn.v_proj.weight").view(T, nkv, hd);
            if (gemma3)
            {
                q = Norm(q, p + "self_attn.q_norm.weight");
                k = Norm(k, p + "self_attn.k_norm.weight");
            }
            q = q * cos + RotateHalf(q) * sin;
            k = k * cos + RotateHalf(k) * sin;
            var allowed = j.le(i);
            if (sliding) allowed = allowed.logical_and(j.gt(i - window));
            var heads = new List<Tensor>();
            for (int head = 0; head < nh; head++)
            {
                int g = head / (nh / nkv);
                var scores = q.select(1, head).matmul(k.select(1, g).t()) * Math.Pow(qpas, -0.5);
                if (attnCap is double ac) scores = (scores / ac).tanh() * ac;
                heads.Add(scores.masked_fill(allowed.logical_not(), double.NegativeInfinity).softmax(-1).matmul(v.select(1, g)));
            }
            h = h + Norm(Lin(cat(heads, -1), p + "self_attn.o_proj.weight"), p + "post_attention_layernorm.weight");
            var y = Norm(h, p + "pre_feedforward_layernorm.weight");
            var mlp = Lin(GeluTanh(Lin(y, p + "mlp.gate_proj.weight")) * Lin(y, p + "mlp.up_proj.weight"), p + "mlp.down_proj.weight");
            h = h + Norm(mlp, p + "post_feedforward_layernorm.weight");
        }
        var logits = Norm(h, "model.norm.weight").matmul(W("model.embed_tokens.weight").t());
        if (finalCap is double fc) logits = (logits / fc).tanh() * fc;
        return logits.MoveToOuterDisposeScope();
    }

    private static readonly long[] Ids = [2, 17, 42, 8, 63, 1, 29, 50, 11];

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void AFolderInTheTransformersLayoutMatchesAFloat64Reference(bool gemma3)
    {
        using var dir = new TempFolder();
        using var scope = NewDisposeScope();
        var cj = ConfigJson(gemma3, window: 3);
        var w = WriteFolder(dir.Path, cj);
        using var model = HfModelLoader.Load(dir.Path, new HfModelLoader.Options { Quantize = false, ComputeDType = ScalarType.Float32 });
        model.eval();
        var logits = model.Logits(tensor(Ids).unsqueeze(0))[0];
        var reference = Reference(cj, w, Ids);
        double rel = Linear4bitTests.RelErr(logits.to(ScalarType.Float64), reference);
        Assert.True(rel < 1e-5, $"relative error {rel}");
        if (!gemma3) Assert.True(reference.abs().max().item<double>() <= 0.3 + 1e-12, "final logits are soft-capped");
    }

    [Fact]
    public void ConfigsReadWithTransformersDefaultsAndBothRopeLayouts()
    {
        var g2 = LlamaConfig.FromJson(new JsonObject
        {
            ["architectures"] = new JsonArray("Gemma2ForCausalLM"), ["hidden_size"] = 3584, ["intermediate_size"] = 14336, ["num_hidden_layers"] = 42,
            ["num_attention_heads"] = 16, ["num_key_value_heads"] = 8, ["vocab_size"] = 256000,
        });
        Assert.Equal(256, g2.HeadDim);
        Assert.Equal(new GemmaFeatures(256, 50.0, 30.0), g2.Gemma);
        Assert.True(g2.TieWordEmbeddings);
        Assert.Equal(4096, g2.SlidingWindowForLayer(0));
        Assert.Null(g2.SlidingWindowForLayer(1));
        Assert.Equal(4096, g2.SlidingWindowForLayer(40));

        // Gemma 3 v4 (rope_theta + rope_local_base_freq + sliding_window_pattern) and v5 (layer_types + rope_parameters per type) agree.
        var v4 = LlamaConfig.FromJson(ConfigJson(gemma3: true, window: 3));
        var v5json = ConfigJson(gemma3: true, window: 3);
        foreach (var key in new[] { "rope_theta", "rope_local_base_freq", "rope_scaling", "sliding_window_pattern" }) v5json.Remove(key);
        v5json["layer_types"] = new JsonArray("sliding_attention", "full_attention");
        v5json["rope_parameters"] = new JsonObject
        {
            ["sliding_attention"] = new JsonObject { ["rope_type"] = "default", ["rope_theta"] = 100.0 },
            ["full_attention"] = new JsonObject { ["rope_type"] = "linear", ["factor"] = 4.0, ["rope_theta"] = 10000.0 },
        };
        var v5 = LlamaConfig.FromJson(v5json);
        foreach (var c in new[] { v4, v5 })
        {
            Assert.Equal(new RopeParameters(100, null), c.RopeForLayer(0));
            Assert.Equal(new RopeParameters(10000, new RopeScaling("linear", 4)), c.RopeForLayer(1));
            Assert.Equal(3, c.SlidingWindowForLayer(0));
            Assert.Null(c.SlidingWindowForLayer(1));
            Assert.True(c.QkNorm);
            Assert.Equal(new GemmaFeatures(12, null, null), c.Gemma);
        }

        var mm = Assert.Throws<FormatException>(() => LlamaConfig.FromJson(new JsonObject { ["architectures"] = new JsonArray("Gemma3ForConditionalGeneration") }));
        Assert.Contains("Gemma3ForConditionalGeneration", mm.Message);
        var act = ConfigJson(false, 3);
        act["hidden_activation"] = "gelu";
        Assert.Contains("hidden_activation 'gelu'", Assert.Throws<FormatException>(() => LlamaConfig.FromJson(act)).Message);
    }

    [Theory]
    [InlineData("gemma-2-9b", 42, 256000L, false)]
    [InlineData("gemma-3-12b", 48, 262208L, true)]
    public void PresetsPlanAndTheirConfigJsonReadsBack(string name, int layers, long vocab, bool gemma3)
    {
        var preset = ModelPresets.Get(name);
        Assert.NotNull(preset.Gemma);
        Assert.Equal(gemma3, preset.QkNorm);
        // Gemma 2: even layers slide (4096); Gemma 3: five of every six (1024), with the local RoPE base on them.
        Assert.Equal(gemma3 ? 1024 : 4096, preset.SlidingWindowForLayer(0));
        Assert.Null(preset.SlidingWindowForLayer(gemma3 ? 5 : 1));
        if (gemma3)
        {
            Assert.Equal(new RopeParameters(10000, null), preset.RopeForLayer(0));
            Assert.Equal(new RopeParameters(1e6, new RopeScaling("linear", 8)), preset.RopeForLayer(5));
        }
        var back = LlamaConfig.FromJson((JsonObject)JsonNode.Parse(new RandomFourBitModel(preset).ConfigJson().ToJsonString())!);
        Assert.Equal(preset.Gemma, back.Gemma);
        for (int i = 0; i < layers; i++)
        {
            Assert.Equal(preset.SlidingWindowForLayer(i), back.SlidingWindowForLayer(i));
            Assert.Equal(preset.RopeForLayer(i), back.RopeForLayer(i));
        }
        var plan = MemoryPlanner.Plan(preset, new PlanOptions { SequenceLength = 512 });
        long h = preset.HiddenSize;
        // Tied embedding, four norms per layer and the final one (Gemma 3: q_norm and k_norm of 256 too), in bf16.
        Assert.Equal(2 * (vocab * h + (4L * layers + 1) * h + (gemma3 ? 2L * layers * 256 : 0)), plan["unquantized_weights"]);
    }

    [Fact]
    public void QLoraTrainsSavesMergesAndGeneratesOnGemma2()
    {
        using var dir = new TempFolder();
        WriteFolder(dir.File("base"), ConfigJson(gemma3: false, window: 6));
        // Cached generation runs the capped attention and the per-layer windows (6 positions) on the new tokens too.
        var (first, last) = QLoraRoundTrip.Run(dir, Ids, learningRate: 0.05, prompt: [2, 17, 42], newTokens: 3);
        Assert.True(last < first, $"loss {first} -> {last}");
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void BatchedGreedyHonoursSoftcapsAndSlidingWindowsPerRow(bool gemma3)
    {
        // Window 3 with prompts up to 6 tokens: the batch's masks must keep each row's window, counted in its own positions.
        var c = LlamaConfig.FromJson(ConfigJson(gemma3, window: 3));
        using var m = LlamaForCausalLM.CreateRandom(c, 5, quantize: false, computeDType: ScalarType.Float32, initStd: 0.3);
        m.eval();
        int[][] prompts = [[3, 14, 15, 9, 2, 6], [7, 1], [1, 2, 3, 4]];
        var batched = TextGenerator.GenerateBatch(m, prompts, new GenerationOptions { MaxNewTokens = 6 });
        using var _ = no_grad();
        for (int r = 0; r < prompts.Length; r++)
        {
            // Reference: the whole sequence through the (windowed) full forward at every step, no cache, no padding.
            var ids = prompts[r].Select(i => (long)i).ToList();
            var expected = new List<int>();
            for (int step = 0; step < 6; step++)
            {
                using var scope = NewDisposeScope();
                int token = (int)m.Logits(tensor(ids.ToArray()).unsqueeze(0))[0, -1].argmax().item<long>();
                expected.Add(token);
                ids.Add(token);
            }
            Assert.Equal(expected, batched[r]);
        }
    }
}
