using System.Text.Json.Nodes;
using QLora.Quant;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

/// <summary>
/// config.json as transformers v4 and v5 write it: RoPE at the top level or in rope_parameters (also per layer type), and
/// which layers get a sliding window (Qwen2's max_window_layers / layer_types, Mistral's default). Expected values are
/// read off transformers' rules by hand.
/// </summary>
public class TransformersConfigTests
{
    private static JsonObject Config(string arch, string extra)
    {
        var c = JsonNode.Parse($$"""
            {"architectures": ["{{arch}}"], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, "rms_norm_eps": 1e-05,
             "max_position_embeddings": 4096, "tie_word_embeddings": false{{extra}}}
            """)!.AsObject();
        return c;
    }

    [Fact]
    public void V5RopeParametersGiveTheSameRopeAsV4TopLevelKeys()
    {
        var v4 = LlamaConfig.FromJson(Config("LlamaForCausalLM", """
            , "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
            """));
        var v5 = LlamaConfig.FromJson(Config("LlamaForCausalLM", """
            , "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
            """));
        var expected = new RopeParameters(500000, new RopeScaling("llama3", 8, 1, 4, 8192));
        Assert.Equal(expected, v4.RopeForLayer(0));
        Assert.Equal(expected, v5.RopeForLayer(0));
        Assert.Equal(expected, v5.RopeForLayer(1));
        Assert.Equal(500000, v5.RopeTheta);

        // v5's plain RoPE, the BC "type" key, and llama3's original_max_position_embeddings defaulting to max_position_embeddings.
        Assert.Equal(new RopeParameters(1e6, null),
            LlamaConfig.FromJson(Config("Qwen2ForCausalLM", """, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}""")).RopeForLayer(1));
        Assert.Equal(new RopeParameters(10000, new RopeScaling("linear", 2)),
            LlamaConfig.FromJson(Config("LlamaForCausalLM", """, "rope_parameters": {"type": "linear", "factor": 2.0}""")).RopeForLayer(0));
        Assert.Equal(new RopeParameters(20000, new RopeScaling("llama3", 4, 1, 2, 4096)),
            LlamaConfig.FromJson(Config("LlamaForCausalLM", """
                , "rope_theta": 20000.0, "rope_parameters": {"rope_type": "llama3", "factor": 4, "low_freq_factor": 1, "high_freq_factor": 2}
                """)).RopeForLayer(0));
    }

    [Fact]
    public void RopeParametersPerLayerTypeApplyToTheLayersOfThatType()
    {
        var c = LlamaConfig.FromJson(Config("Qwen2ForCausalLM", """
            , "rope_theta": 1000.0, "layer_types": ["sliding_attention", "full_attention"],
              "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                  "sliding_attention": {"rope_type": "default"}}
            """));
        Assert.Equal(new RopeParameters(1000, null), c.RopeForLayer(0));
        Assert.Equal(new RopeParameters(1e6, new RopeScaling("linear", 8)), c.RopeForLayer(1));
    }

    [Theory]
    [InlineData("""{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}""", "'yarn'")]
    [InlineData("""{"type": "dynamic", "factor": 2.0}""", "'dynamic'")]
    [InlineData("""{"rope_type": "longrope", "short_factor": [1], "long_factor": [1]}""", "'longrope'")]
    [InlineData("""{"rope_type": "default", "partial_rotary_factor": 0.5}""", "partial_rotary_factor")]
    [InlineData("""{"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}""", "low_freq_factor")]
    [InlineData("""{"rope_type": "linear"}""", "factor")]
    public void AnUnimplementedRopeIsRefusedByName(string block, string named)
    {
        foreach (var key in new[] { "rope_scaling", "rope_parameters" })
        {
            var e = Assert.Throws<FormatException>(() => LlamaConfig.FromJson(Config("LlamaForCausalLM", $", \"{key}\": {block}")));
            Assert.Contains(named, e.Message);
            Assert.Contains(key, e.Message);
        }
    }

    [Fact]
    public void Qwen2WindowsOnlyTheLayersTransformersWindows()
    {
        // use_sliding_window off: no layer windowed, whatever sliding_window says.
        var off = LlamaConfig.FromJson(Config("Qwen2ForCausalLM", """, "use_sliding_window": false, "sliding_window": 4, "max_window_layers": 0"""));
        Assert.Null(off.SlidingWindowForLayer(0));
        Assert.Null(off.SlidingWindowForLayer(1));
        // On: layers from max_window_layers on (here layer 1), sliding_window defaulting to 4096.
        var on = LlamaConfig.FromJson(Config("Qwen2ForCausalLM", """, "use_sliding_window": true, "max_window_layers": 1"""));
        Assert.Null(on.SlidingWindowForLayer(0));
        Assert.Equal(4096, on.SlidingWindowForLayer(1));
        // max_window_layers defaults to 28: a 2-layer model has no windowed layer.
        var deflt = LlamaConfig.FromJson(Config("Qwen2ForCausalLM", """, "use_sliding_window": true, "sliding_window": 4"""));
        Assert.Null(deflt.SlidingWindowForLayer(1));
        // layer_types, when given, decides.
        var typed = LlamaConfig.FromJson(Config("Qwen2ForCausalLM", """
            , "use_sliding_window": true, "sliding_window": 4, "max_window_layers": 28, "layer_types": ["sliding_attention", "full_attention"]
            """));
        Assert.Equal(4, typed.SlidingWindowForLayer(0));
        Assert.Null(typed.SlidingWindowForLayer(1));
        Assert.Contains("chunked_attention", Assert.Throws<FormatException>(() => LlamaConfig.FromJson(Config("Qwen2ForCausalLM",
            """, "layer_types": ["chunked_attention", "full_attention"]"""))).Message);
    }

    [Fact]
    public void MistralWithoutSlidingWindowGetsTransformersDefault()
    {
        // MistralConfig's default is 4096 when the key is absent; an explicit null means no window. Llama has none.
        var absent = LlamaConfig.FromJson(Config("MistralForCausalLM", ""));
        Assert.Equal(4096, absent.SlidingWindowForLayer(0));
        Assert.Equal(4096, absent.SlidingWindowForLayer(1));
        Assert.Null(LlamaConfig.FromJson(Config("MistralForCausalLM", """, "sliding_window": null""")).SlidingWindowForLayer(0));
        Assert.Equal(7, LlamaConfig.FromJson(Config("MistralForCausalLM", """, "sliding_window": 7""")).SlidingWindowForLayer(1));
        Assert.Null(LlamaConfig.FromJson(Config("LlamaForCausalLM", """, "sliding_window": 7""")).SlidingWindowForLayer(1));
    }

    /// <summary>A v5 Llama 3.1-style folder and a Qwen2 folder with a windowed upper layer load and match float64.</summary>
    [Theory]
    [InlineData("v5-llama3")]
    [InlineData("v5-per-layer-type")]
    [InlineData("qwen2-window")]
    public void FoldersInTheseLayoutsMatchAFloat64Reference(string layout)
    {
        using var dir = new TempFolder();
        using var scope = NewDisposeScope();
        bool qwen = layout != "v5-llama3";
        // The reference's architecture, built from the values worked out by hand (not parsed).
        var c = TinyLlama.Config(qwen: qwen, layers: 2) with { MaxPositionEmbeddings = 4096 };
        string extra;
        switch (layout)
        {
            case "v5-llama3":
                c = c with { RopeTheta = 500000, RopeScaling = new RopeScaling("llama3", 8, 1, 4, 16) };
                extra = """, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}""";
                break;
            case "v5-per-layer-type":
                c = c with
                {
                    LayerTypes = [LlamaConfig.FullAttention, LlamaConfig.SlidingAttention],
                    RopeByLayerType = new Dictionary<string, RopeParameters>
                    {
                        [LlamaConfig.FullAttention] = new(1e6, new RopeScaling("linear", 8)),
                        [LlamaConfig.SlidingAttention] = new(100, null),
                    },
                };
                extra = """, "layer_types": ["full_attention", "sliding_attention"], "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}, "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}""";
                break;
            default:
                c = c with { SlidingWindow = 3, LayerTypes = [LlamaConfig.FullAttention, LlamaConfig.SlidingAttention] };
                extra = """, "use_sliding_window": true, "sliding_window": 3, "max_window_layers": 1""";
                break;
        }
        var w = new Dictionary<string, Tensor>();
        using (var probe = LlamaForCausalLM.CreateRandom(c, 50, quantize: false, computeDType: ScalarType.Float32, initStd: 0.1))
            foreach (var (name, p) in probe.named_parameters()) w[name] = p.detach().clone();
        SafetensorsWriter.WriteFile(dir.File("model.safetensors"),
            w.Select(kv => (kv.Key, TensorDType.F32, kv.Value.shape, kv.Value.contiguous().bytes.ToArray())));
        File.WriteAllText(dir.File("config.json"), Config(c.Architecture, extra).ToJsonString());

        using var model = HfModelLoader.Load(dir.Path, new HfModelLoader.Options { Quantize = false, ComputeDType = ScalarType.Float32 });
        model.eval();
        long[] ids = [3, 4, 5, 6, 3, 7, 8, 9, 5, 60, 2, 17];
        var logits = model.Logits(tensor(ids).unsqueeze(0))[0];
        var reference = LlamaModelTests.ReferenceLogits(c, n => w[n], ids);
        double rel = Linear4bitTests.RelErr(logits, reference);
        Assert.True(rel < 1e-5, $"{layout}: relative error {rel}");
    }
}
