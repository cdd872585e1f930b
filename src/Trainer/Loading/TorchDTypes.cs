using QLora.Quant;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>Between safetensors' float dtypes and torch's, and from a tensor's stored bytes to a torch tensor.</summary>
public static class TorchDTypes
{
    /// <summary>The torch dtype of a stored float tensor; other dtypes are an <see cref="InvalidDataException"/> naming the tensor.</summary>
    public static ScalarType ToScalarType(TensorInfo info) => info.DType switch
    {
        TensorDType.F32 => ScalarType.Float32,
        TensorDType.BF16 => ScalarType.BFloat16,
        TensorDType.F16 => ScalarType.Float16,
        _ => throw new InvalidDataException($"{info.Name} has dtype {info.DType}; expected F32, BF16 or F16"),
    };

    /// <summary>The safetensors dtype of a torch float dtype.</summary>
    public static TensorDType ToTensorDType(ScalarType t) => t switch
    {
        ScalarType.Float32 => TensorDType.F32,
        ScalarType.BFloat16 => TensorDType.BF16,
        ScalarType.Float16 => TensorDType.F16,
        _ => throw new NotSupportedException($"dtype {t} cannot be stored as a float tensor"),
    };

    /// <summary>The 4-bit formats' float type of a torch dtype (bf16, fp16 or fp32).</summary>
    public static FloatType ToFloatType(ScalarType t) => t switch
    {
        ScalarType.BFloat16 => FloatType.BFloat16,
        ScalarType.Float16 => FloatType.Float16,
        ScalarType.Float32 => FloatType.Float32,
        _ => throw new ArgumentException($"dtype {t} is not bfloat16, float16 or float32"),
    };

    /// <summary>The torch dtype of a 4-bit formats' float type.</summary>
    public static ScalarType ToScalarType(FloatType t) => t switch
    {
        FloatType.BFloat16 => ScalarType.BFloat16,
        FloatType.Float16 => ScalarType.Float16,
        _ => ScalarType.Float32,
    };

    /// <summary>A new CPU tensor holding a copy of the stored bytes of <paramref name="info"/>.</summary>
    public static Tensor FromBytes(ReadOnlySpan<byte> bytes, TensorInfo info)
    {
        var t = empty(info.Shape, dtype: ToScalarType(info));
        if (info.ByteLength > 0) bytes.CopyTo(t.bytes);
        return t;
    }
}
