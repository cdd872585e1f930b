using QLora.Quant.Gguf;

namespace QLora.Quant.Tests.Gguf;

/// The per-tensor type mix, against llama.cpp's quantizer rules worked out by hand for two shapes.
public sealed class GgufFileTypeTests
{
    [Fact]
    public void Q4_K_M_of_a_32_layer_model_gives_half_the_attn_v_and_ffn_down_q6_K()
    {
        // use_more_bits for 32 layers: 0..3, 28..31 and every third from 6: 6, 9, ..., 27 (16 layers).
        int[] more = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31];
        for (int i = 0; i < 32; i++)
        {
            var expected = more.Contains(i) ? GgmlType.Q6_K : GgmlType.Q4_K;
            Assert.Equal(expected, GgufFileType.Q4_K_M.TensorType($"blk.{i}.attn_v.weight", [1024, 4096], i, 32, false));
            Assert.Equal(expected, GgufFileType.Q4_K_M.TensorType($"blk.{i}.ffn_down.weight", [4096, 11008], i, 32, false));
            Assert.Equal(GgmlType.Q4_K, GgufFileType.Q4_K_M.TensorType($"blk.{i}.attn_q.weight", [4096, 4096], i, 32, false));
            Assert.Equal(GgmlType.F32, GgufFileType.Q4_K_M.TensorType($"blk.{i}.attn_norm.weight", [4096], i, 32, false));
        }
        Assert.Equal(GgmlType.Q6_K, GgufFileType.Q4_K_M.TensorType("output.weight", [32000, 4096], -1, 32, false));
        Assert.Equal(GgmlType.Q4_K, GgufFileType.Q4_K_M.TensorType("token_embd.weight", [32000, 4096], -1, 32, false));
        Assert.Equal(GgmlType.Q6_K, GgufFileType.Q4_K_M.TensorType("token_embd.weight", [32000, 4096], -1, 32, true));
        Assert.Equal(GgmlType.Q6_K, GgufFileType.Q4_0.TensorType("output.weight", [32000, 4096], -1, 32, false));
        Assert.Equal(GgmlType.Q8_0, GgufFileType.Q8_0.TensorType("output.weight", [32000, 4096], -1, 32, false));
        Assert.Equal(GgmlType.F32, GgufFileType.Q8_0.TensorType("blk.0.attn_q.bias", [4096], 0, 32, false));
    }

    [Fact]
    public void Rows_that_are_not_whole_blocks_fall_back_as_llama_cpp_does()
    {
        // 4 layers: use_more_bits is true for layers 2 and 3. Rows of 688 are not multiples of 256 or 32.
        Assert.Equal(GgmlType.F16, GgufFileType.Q4_K_M.TensorType("blk.0.ffn_down.weight", [256, 688], 0, 4, false));
        Assert.Equal(GgmlType.F16, GgufFileType.Q4_K_M.TensorType("blk.3.ffn_down.weight", [256, 688], 3, 4, false));
        Assert.Equal(GgmlType.Q5_0, GgufFileType.Q4_K_M.TensorType("blk.0.ffn_down.weight", [256, 672], 0, 4, false));
        Assert.Equal(GgmlType.Q8_0, GgufFileType.Q4_K_M.TensorType("blk.3.ffn_down.weight", [256, 672], 3, 4, false));
        Assert.Equal(GgmlType.Q6_K, GgufFileType.Q4_K_M.TensorType("blk.2.attn_v.weight", [128, 256], 2, 4, false));
        Assert.Equal(GgmlType.Q4_K, GgufFileType.Q4_K_M.TensorType("blk.1.attn_v.weight", [128, 256], 1, 4, false));
        Assert.Equal(GgmlType.Q8_0, GgufFileType.Q4_K_M.TensorType("output.weight", [259, 160], -1, 4, false));
        Assert.Equal(GgmlType.F16, GgufFileType.Q8_0.TensorType("blk.0.ffn_down.weight", [256, 688], 0, 4, false));
        Assert.Equal(GgmlType.F16, GgufFileType.Q4_0.TensorType("blk.0.ffn_down.weight", [256, 688], 0, 4, false));
    }

    [Fact]
    public void Names_parse_and_map_to_llama_ftype_values()
    {
        Assert.Equal([1u, 32u, 7u, 2u, 15u], GgufFileTypes.Names.Select(n => GgufFileTypes.Parse(n).LlamaFType()));
        Assert.Equal(GgufFileType.Q4_K_M, GgufFileTypes.Parse("Q4_K_M"));
        Assert.Contains("q4_k_m", Assert.Throws<FormatException>(() => GgufFileTypes.Parse("q3_k")).Message);
    }
}
