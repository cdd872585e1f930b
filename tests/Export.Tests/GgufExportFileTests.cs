using System.Buffers.Binary;
using QLora.Quant.Gguf;
using QLora.Trainer;
using static TorchSharp.torch;

namespace QLora.Export.Tests;

/// <summary>What the exported file holds, read back with the GGUF reader and with llama.cpp's own loader.</summary>
public sealed class GgufExportFileTests(ExportedTinyModel model) : IClassFixture<ExportedTinyModel>
{
    [Fact]
    public void Metadata_carries_the_config_and_tokenizer_llama_cpp_needs()
    {
        using var r = GgufReader.Open(model.File(GgufFileType.F16));
        var m = r.MetadataByKey;
        Assert.Equal("llama", m["general.architecture"].AsString());
        Assert.Equal(1L, m["general.file_type"].AsInt64());
        Assert.Equal(4L, m["llama.block_count"].AsInt64());
        Assert.Equal(512L, m["llama.context_length"].AsInt64());
        Assert.Equal(256L, m["llama.embedding_length"].AsInt64());
        Assert.Equal(688L, m["llama.feed_forward_length"].AsInt64());
        Assert.Equal(4L, m["llama.attention.head_count"].AsInt64());
        Assert.Equal(2L, m["llama.attention.head_count_kv"].AsInt64());
        Assert.Equal(64L, m["llama.rope.dimension_count"].AsInt64());
        Assert.Equal(10000f, (float)m["llama.rope.freq_base"].Value);
        Assert.Equal(1e-5f, (float)m["llama.attention.layer_norm_rms_epsilon"].Value);
        Assert.Equal(259L, m["llama.vocab_size"].AsInt64());
        Assert.Equal("gpt2", m["tokenizer.ggml.model"].AsString());
        Assert.Equal("gpt-2", m["tokenizer.ggml.pre"].AsString());
        Assert.Equal(GgufValueType.String, m["tokenizer.ggml.merges"].ElementType);
        var tokens = m["tokenizer.ggml.tokens"].AsArray<string>();
        var types = m["tokenizer.ggml.token_type"].AsArray<int>();
        Assert.Equal(259, tokens.Length);
        Assert.Equal(["<s>", "</s>", "<pad>"], tokens[256..]);
        Assert.Equal([3, 3, 3], types[256..]); // CONTROL
        Assert.All(types[..256], t => Assert.Equal(1, t)); // NORMAL
        Assert.Equal("Ġ", tokens[32]); // byte-level strings as tokenizer.json writes them
        Assert.Equal(256L, m["tokenizer.ggml.bos_token_id"].AsInt64());
        Assert.Equal(257L, m["tokenizer.ggml.eos_token_id"].AsInt64());
        Assert.Equal(258L, m["tokenizer.ggml.padding_token_id"].AsInt64());
        Assert.True((bool)m["tokenizer.ggml.add_bos_token"].Value);
        Assert.False((bool)m["tokenizer.ggml.add_eos_token"].Value);
        Assert.Equal(model.Tokenizer.ChatTemplateSource, m["tokenizer.chat_template"].AsString());
        Assert.Equal(32L, m["general.alignment"].AsInt64());
        // llama.cpp's loader reads the same values
        using var cpp = new LlamaCpp(model.File(GgufFileType.F16));
        Assert.Equal("4", cpp.Metadata("llama.block_count"));
        Assert.Equal("gpt-2", cpp.Metadata("tokenizer.ggml.pre"));
    }

    [Fact]
    public void Q_and_K_rows_are_permuted_per_head_and_weights_hold_the_merged_values()
    {
        using var r = GgufReader.Open(model.File(GgufFileType.F16));
        using var merged = MergedWeights.Open(model.BaseFolder, model.Adapter);
        foreach (var (hf, gguf, heads) in new[]
                 {
                     ("model.layers.1.self_attn.q_proj.weight", "blk.1.attn_q.weight", 4),
                     ("model.layers.1.self_attn.k_proj.weight", "blk.1.attn_k.weight", 2),
                     ("model.layers.1.self_attn.v_proj.weight", "blk.1.attn_v.weight", 0),
                 })
        {
            using var w = merged.Float32(hf);
            Assert.True(merged.IsAdapted(hf));
            var info = r.GetInfo(gguf);
            Assert.Equal(GgmlType.F16, info.Type);
            Assert.Equal(w.shape, info.Shape);
            var bytes = r.ReadTensor(gguf);
            long rows = w.shape[0], cols = w.shape[1], d = heads == 0 ? rows : rows / heads;
            var src = w.data<float>().ToArray();
            for (long row = 0; row < rows; row++)
            {
                // spec: within each head, new row 2i = old row i, new row 2i+1 = old row d/2 + i
                long head = row / d, within = row % d;
                long old = heads == 0 ? row : head * d + (within % 2 == 0 ? within / 2 : d / 2 + within / 2);
                for (long c = 0; c < cols; c += 17)
                {
                    float got = (float)BinaryPrimitives.ReadHalfLittleEndian(bytes.AsSpan((int)(2 * (row * cols + c))));
                    Assert.Equal((float)(Half)src[old * cols + c], got);
                }
            }
        }
        Assert.Equal(GgmlType.F32, r.GetInfo("blk.0.attn_norm.weight").Type);
        Assert.Equal(GgmlType.F32, r.GetInfo("output_norm.weight").Type);
        Assert.Equal(39, r.Tensors.Count);
    }

    [Fact]
    public void Q4_K_M_uses_llama_cpps_type_mix_for_this_shape()
    {
        using var r = GgufReader.Open(model.File(GgufFileType.Q4_K_M));
        Assert.Equal(15L, r.MetadataByKey["general.file_type"].AsInt64());
        Assert.Equal(2L, r.MetadataByKey["general.quantization_version"].AsInt64());
        Assert.Equal(GgmlType.Q6_K, r.GetInfo("output.weight").Type);
        Assert.Equal(GgmlType.Q4_K, r.GetInfo("token_embd.weight").Type);
        Assert.Equal(GgmlType.Q4_K, r.GetInfo("blk.1.attn_v.weight").Type);
        Assert.Equal(GgmlType.Q6_K, r.GetInfo("blk.2.attn_v.weight").Type); // use_more_bits(2, 4)
        Assert.Equal(GgmlType.F16, r.GetInfo("blk.0.ffn_down.weight").Type); // 688 columns: q4_K → q5_0 → F16
        Assert.Equal(GgmlType.Q4_K, r.GetInfo("blk.0.ffn_up.weight").Type);
        // the stored q4_K blocks decode close to the merged weight
        using var merged = MergedWeights.Open(model.BaseFolder, model.Adapter);
        using var w = merged.Float32("model.layers.0.mlp.up_proj.weight");
        var back = new float[w.numel()];
        GgmlDequantizer.Dequantize(GgmlType.Q4_K, r.ReadTensor("blk.0.ffn_up.weight"), back);
        var src = w.data<float>().ToArray();
        double err = 0, norm = 0;
        for (int i = 0; i < src.Length; i++) { err += (back[i] - src[i]) * (back[i] - src[i]); norm += src[i] * src[i]; }
        Assert.True(err / norm < 0.01, $"q4_K relative squared error {err / norm}");
    }
}
