using System.Text.Json.Nodes;
using QLora.Quant;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

/// <summary>
/// Qwen3 (q_norm / k_norm on every head before RoPE, head_dim independent of hidden_size) from a folder in the
/// transformers layout, against a float64 forward written from transformers' modeling_qwen3; then the QLoRA path on it.
/// </summary>
public class Qwen3ModelTests
{
    // hidden 32 with 4 heads of 16: q_proj is [64, 32] and o_proj [32, 64], as Qwen3-0.6B's 1024 → 2048 is.
    private static LlamaConfig Config() => TinyLlama.Config() with
    {
        Architecture = "Qwen3ForCausalLM", HeadDim = 16, QkNorm = true, RmsNormEps = 1e-6, RopeTheta = 1000000,
    };

    private static Dictionary<string, Tensor> WriteFolder(string dir, LlamaConfig c)
    {
        Directory.CreateDirectory(dir);
        var w = new Dictionary<string, Tensor>();
        using (var probe = LlamaForCausalLM.CreateRandom(c, 7, quantize: false, computeDType: ScalarType.Float32, initStd: 0.1))
            foreach (var (name, p) in probe.named_parameters()) w[name] = p.detach().clone();
        var gen = new Generator(11);
        foreach (var k in w.Keys.Where(k => k.EndsWith("norm.weight", StringComparison.Ordinal)).ToList())
            w[k] = 1 + 0.2 * randn(w[k].shape, generator: gen); // norms that matter
        Assert.Equal([16L], w["model.layers.0.self_attn.q_norm.weight"].shape);
        SafetensorsWriter.WriteFile(Path.Combine(dir, "model.safetensors"),
            w.Select(kv => (kv.Key, TensorDType.F32, kv.Value.shape, kv.Value.contiguous().bytes.ToArray())), new Dictionary<string, string> { ["format"] = "pt" });
        // As Qwen3 config.json files ship: head_dim given, sliding_window present but off.
        var config = new JsonObject
        {
            ["architectures"] = new JsonArray("Qwen3ForCausalLM"), ["model_type"] = "qwen3", ["hidden_size"] = c.HiddenSize,
            ["intermediate_size"] = c.IntermediateSize, ["num_hidden_layers"] = c.NumHiddenLayers, ["num_attention_heads"] = c.NumAttentionHeads,
            ["num_key_value_heads"] = c.NumKeyValueHeads, ["head_dim"] = c.HeadDim, ["vocab_size"] = c.VocabSize, ["rms_norm_eps"] = c.RmsNormEps,
            ["rope_theta"] = c.RopeTheta, ["max_position_embeddings"] = 40960, ["tie_word_embeddings"] = false, ["attention_bias"] = false,
            ["sliding_window"] = 4, ["use_sliding_window"] = false, ["max_window_layers"] = 2, ["hidden_act"] = "silu", ["torch_dtype"] = "float32",
        };
        File.WriteAllText(Path.Combine(dir, "config.json"), config.ToJsonString());
        return w;
    }

    /// <summary>
    /// Float64 forward after transformers' Qwen3: q = q_norm(q_proj(x).view(T, heads, head_dim)), likewise k; RoPE by
    /// rotate_half with cos/sin of cat(freqs, freqs); softmax(q·kᵀ · head_dim^-½ + causal) · v; SwiGLU MLP; RMSNorm = w · x / √(mean x² + eps).
    /// </summary>
    private static Tensor Reference(LlamaConfig c, Dictionary<string, Tensor> w, long[] ids)
    {
        using var scope = NewDisposeScope();
        int T = ids.Length, hd = c.HeadDim, nh = c.NumAttentionHeads, nkv = c.NumKeyValueHeads;
        Tensor W(string n) => w[n].to(ScalarType.Float64);
        Tensor Rms(Tensor x, string n) => W(n) * x * (x.pow(2).mean([-1L], keepdim: true) + c.RmsNormEps).rsqrt();
        Tensor Lin(Tensor x, string n) => x.matmul(W(n).t());
        var invFreq = 1.0 / pow(c.RopeTheta, arange(0, hd, 2, dtype: ScalarType.Float64) / hd);
        var freqs = arange(T, dtype: ScalarType.Float64).unsqueeze(1) * invFreq.unsqueeze(0);
        var emb = cat([freqs, freqs], -1);
        Tensor cos = emb.cos().unsqueeze(1), sin = emb.sin().unsqueeze(1); // [T, 1, hd]
        Tensor RotateHalf(Tensor x) => cat([-x[.., .., (hd / 2)..], x[.., .., ..(hd / 2)]], -1);
        var causal = ones(T, T, dtype: ScalarType.Bool).triu(1);
        var h = W("model.embed_tokens.weight").index_select(0, tensor(ids));
        for (int l = 0; l < c.NumHiddenLayers; l++)
        {
            string p = $"model.layers.{l}.";
            var x = Rms(h, p + "input_layernorm.weight");
            var q = Rms(Lin(x, p + "self_attn.q_proj.weight").view(T, nh, hd), p + "self_attn.q_norm.weight");
            var k = Rms(Lin(x, p + "self_attn.k_proj.weight").view(T, nkv, hd), p + "self_attn.k_norm.weight");
            var v = Lin(x, p + "self_attn.v_proj.weight").view(T, nkv, hd);
            q = q * cos + RotateHalf(q) * sin;
            k = k * cos + RotateHalf(k) * sin;
            var heads = new List<Tensor>();
            for (int head = 0; head < nh; head++)
            {
                int g = head / (nh / nkv);
                var scores = q.select(1, head).matmul(k.select(1, g).t()) * Math.Pow(hd, -0.5);
                heads.Add(scores.masked_fill(causal, double.NegativeInfinity).softmax(-1).matmul(v.select(1, g)));
            }
            h = h + Lin(cat(heads, -1), p + "self_attn.o_proj.weight");
            var y = Rms(h, p + "post_attention_layernorm.weight");
            var gate = Lin(y, p + "mlp.gate_proj.weight");
            h = h + Lin(gate * gate.sigmoid() * Lin(y, p + "mlp.up_proj.weight"), p + "mlp.down_proj.weight");
        }
        return Rms(h, "model.norm.weight").matmul(W("lm_head.weight").t()).MoveToOuterDisposeScope();
    }

    private static readonly long[] Ids = [3, 17, 42, 8, 63, 1, 29, 50, 11];

    [Fact]
    public void AFolderInTheTransformersLayoutLoadsAndMatchesAFloat64Reference()
    {
        using var dir = new TempFolder();
        using var scope = NewDisposeScope();
        var c = Config();
        var w = WriteFolder(dir.Path, c);
        var read = LlamaConfig.Load(dir.File("config.json"));
        Assert.True(read.QkNorm);
        Assert.Equal(16, read.HeadDim);
        Assert.Null(read.SlidingWindow); // use_sliding_window: false
        Assert.False(read.AttentionBias);

        using var model = HfModelLoader.Load(dir.Path, new HfModelLoader.Options { Quantize = false, ComputeDType = ScalarType.Float32 });
        model.eval();
        var logits = model.Logits(tensor(Ids).unsqueeze(0))[0];
        var reference = Reference(c, w, Ids);
        double rel = Linear4bitTests.RelErr(logits, reference);
        Assert.True(rel < 1e-5, $"relative error {rel}");

        // Without q_norm/k_norm the logits are clearly different: the norms are really applied.
        using var plain = LlamaForCausalLM.FromWeights(c with { QkNorm = false, Architecture = "LlamaForCausalLM" }, n => w.GetValueOrDefault(n), quantize: false, computeDType: ScalarType.Float32);
        plain.eval();
        Assert.True(Linear4bitTests.RelErr(plain.Logits(tensor(Ids).unsqueeze(0))[0], reference) > 1e-2);
    }

    [Fact]
    public void QLoraTrainsSavesMergesAndGeneratesOnQwen3()
    {
        using var dir = new TempFolder();
        WriteFolder(dir.File("base"), Config());
        // The cached path applies q_norm / k_norm to each new token's heads as the full forward does.
        var (first, last) = QLoraRoundTrip.Run(dir, Ids, learningRate: 0.02, prompt: [3, 17, 42], newTokens: 5);
        Assert.True(last < 0.9 * first, $"loss {first} -> {last}");
    }

    [Fact]
    public void ThePlannerKnowsQwen3()
    {
        var preset = ModelPresets.Get("qwen3-8b");
        Assert.Equal("Qwen3ForCausalLM", preset.Architecture);
        Assert.True(preset.QkNorm);
        var plan = MemoryPlanner.Plan(preset, new PlanOptions { SequenceLength = 512 });
        // 36 layers × (q 4096×4096, k/v 1024×4096 each, o 4096×4096, gate/up 12288×4096, down 4096×12288) = 7.55e9 parameters in 4-bit.
        long projections = 36L * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 12288 * 4096);
        Assert.Equal(6_945_767_424L, projections);
        Assert.True(plan.PeakBytes > projections / 2, "the 4-bit projections alone take half a byte per parameter");
        // embeddings + lm_head (2 × 151936 × 4096) and norms, including 36 × 2 × 128 for q_norm/k_norm, in bf16.
        Assert.Equal(2 * (2L * 151936 * 4096 + (2L * 36 + 1) * 4096 + 2L * 36 * 128), plan["unquantized_weights"]);
    }
}
