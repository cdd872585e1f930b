namespace QLora.Quant.Gguf;

/// <summary>The file types <c>qlora export gguf --type</c> writes, named as llama.cpp's converter and quantizer name them.</summary>
public enum GgufFileType
{
    /// <summary>f16: 2-D weights in float16 (convert_hf_to_gguf --outtype f16).</summary>
    F16,
    /// <summary>bf16: 2-D weights in bfloat16.</summary>
    BF16,
    /// <summary>q8_0: 2-D weights in q8_0.</summary>
    Q8_0,
    /// <summary>q4_0: llama-quantize Q4_0 (q4_0 weights, q6_K output).</summary>
    Q4_0,
    /// <summary>q4_k_m: llama-quantize Q4_K_M (q4_K weights; q6_K output and, in half the layers, attn_v and ffn_down).</summary>
    Q4_K_M,
}

/// <summary>
/// Names, <c>general.file_type</c> values and the per-tensor type choice of each <see cref="GgufFileType"/>. The choice
/// follows llama.cpp's quantizer (<c>llama_tensor_get_type</c> without an importance matrix) for the dense Llama-family
/// models this project trains, including its fallbacks for rows that are not whole blocks.
/// </summary>
public static class GgufFileTypes
{
    /// <summary>The accepted <c>--type</c> names.</summary>
    public static readonly IReadOnlyList<string> Names = ["f16", "bf16", "q8_0", "q4_0", "q4_k_m"];

    /// <summary>Parses a <c>--type</c> name (case-insensitive).</summary>
    public static GgufFileType Parse(string name) => name.ToLowerInvariant() switch
    {
        "f16" => GgufFileType.F16,
        "bf16" => GgufFileType.BF16,
        "q8_0" => GgufFileType.Q8_0,
        "q4_0" => GgufFileType.Q4_0,
        "q4_k_m" => GgufFileType.Q4_K_M,
        _ => throw new FormatException($"GGUF type '{name}' is not supported; use one of {string.Join(", ", Names)}"),
    };

    /// <summary>The <c>--type</c> name.</summary>
    public static string Name(this GgufFileType type) => Names[(int)type];

    /// <summary>llama.cpp's <c>llama_ftype</c> value, written as <c>general.file_type</c>.</summary>
    public static uint LlamaFType(this GgufFileType type) => type switch
    {
        GgufFileType.F16 => 1,
        GgufFileType.BF16 => 32,
        GgufFileType.Q8_0 => 7,
        GgufFileType.Q4_0 => 2,
        GgufFileType.Q4_K_M => 15,
        _ => throw new ArgumentOutOfRangeException(nameof(type)),
    };

    /// <summary>True when the file holds block-quantized tensors (then <c>general.quantization_version</c> is written).</summary>
    public static bool IsQuantized(this GgufFileType type) => type is GgufFileType.Q8_0 or GgufFileType.Q4_0 or GgufFileType.Q4_K_M;

    /// <summary>
    /// The type of tensor <paramref name="name"/> (llama.cpp's name) of PyTorch-order <paramref name="shape"/>:
    /// 1-D tensors, norms and biases stay F32; the rest follows the file type, with llama.cpp's quantizer rules for
    /// the output matrix (and the embedding when it is tied to it), attn_v and ffn_down in layer <paramref name="layer"/>
    /// of <paramref name="layers"/>, and its fallbacks when a row is not a whole number of blocks (q4_K → q5_0,
    /// q5_K → (not reached), q6_K → q8_0; a row that is not a multiple of 32 → F16).
    /// </summary>
    public static GgmlType TensorType(this GgufFileType type, string name, long[] shape, int layer, int layers, bool tiedEmbeddings, bool seventyB = false)
    {
        if (shape.Length < 2 || !name.EndsWith("weight", StringComparison.Ordinal) || name.Contains("_norm.weight", StringComparison.Ordinal))
            return GgmlType.F32;
        long columns = shape[^1];
        switch (type)
        {
            case GgufFileType.F16: return GgmlType.F16;
            case GgufFileType.BF16: return GgmlType.BF16;
            case GgufFileType.Q8_0: return Fallback(GgmlType.Q8_0, columns);
        }
        var t = type == GgufFileType.Q4_0 ? GgmlType.Q4_0 : GgmlType.Q4_K;
        bool output = name == "output.weight" || (tiedEmbeddings && name == "token_embd.weight");
        if (output)
        {
            t = columns % t.BlockSize() != 0 ? GgmlType.Q8_0 : GgmlType.Q6_K;
        }
        else if (type == GgufFileType.Q4_K_M)
        {
            if (name.Contains("attn_v.weight", StringComparison.Ordinal))
            {
                if (UseMoreBits(layer, layers)) t = GgmlType.Q6_K;
                else if (seventyB) t = GgmlType.Q5_K; // llama.cpp gives the 8x-shared attn_v of 70B models more bits
            }
            else if (name.Contains("ffn_down", StringComparison.Ordinal) && UseMoreBits(layer, layers)) t = GgmlType.Q6_K;
        }
        return Fallback(t, columns);
    }

    /// <summary>llama.cpp's <c>use_more_bits</c>: the first and last eighth of the layers and every third one between.</summary>
    public static bool UseMoreBits(int layer, int layers) => layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2;

    private static GgmlType Fallback(GgmlType t, long columns)
    {
        if (columns % t.BlockSize() == 0) return t;
        var f = t switch
        {
            GgmlType.Q4_K => GgmlType.Q5_0,
            GgmlType.Q5_K => GgmlType.Q5_0, // llama.cpp uses q5_1 here; only reached for 70B shapes, whose rows are whole blocks
            GgmlType.Q6_K => GgmlType.Q8_0,
            _ => GgmlType.F16, // q8_0 and q4_0 rows that are not a multiple of 32: the converter keeps them in F16
        };
        return columns % f.BlockSize() == 0 ? f : GgmlType.F16;
    }
}
