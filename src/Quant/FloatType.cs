namespace QLora.Quant;

/// <summary>The floating-point types a 4-bit weight is quantized from and dequantized to.</summary>
public enum FloatType
{
    /// <summary>IEEE binary32.</summary>
    Float32,
    /// <summary>bfloat16: the top 16 bits of a float32, rounded to nearest even.</summary>
    BFloat16,
    /// <summary>IEEE binary16.</summary>
    Float16,
}

/// <summary>Sizes, PyTorch names and element conversions of <see cref="FloatType"/>.</summary>
public static class FloatTypes
{
    /// <summary>Bytes per element.</summary>
    public static int Size(this FloatType type) => type == FloatType.Float32 ? 4 : 2;

    /// <summary>The PyTorch dtype name ("float32", "bfloat16", "float16") used in quant states and configs.</summary>
    public static string Name(this FloatType type) => type switch
    {
        FloatType.Float32 => "float32",
        FloatType.BFloat16 => "bfloat16",
        _ => "float16",
    };

    /// <summary>Parses a PyTorch dtype name, with or without the "torch." prefix; "float"/"half" are accepted as aliases.</summary>
    public static FloatType Parse(string name)
    {
        var n = name.StartsWith("torch.", StringComparison.Ordinal) ? name[6..] : name;
        return n.ToLowerInvariant() switch
        {
            "float32" or "float" or "fp32" => FloatType.Float32,
            "bfloat16" or "bf16" => FloatType.BFloat16,
            "float16" or "half" or "fp16" => FloatType.Float16,
            _ => throw new FormatException($"unknown float dtype '{name}': expected float32, bfloat16 or float16"),
        };
    }

    /// <summary>The safetensors dtype that stores this type.</summary>
    public static TensorDType ToTensorDType(this FloatType type) => type switch
    {
        FloatType.Float32 => TensorDType.F32,
        FloatType.BFloat16 => TensorDType.BF16,
        _ => TensorDType.F16,
    };

    /// <summary>The float type of a safetensors dtype, or null if it is not F32/BF16/F16.</summary>
    public static FloatType? FromTensorDType(TensorDType dtype) => dtype switch
    {
        TensorDType.F32 => FloatType.Float32,
        TensorDType.BF16 => FloatType.BFloat16,
        TensorDType.F16 => FloatType.Float16,
        _ => null,
    };

    /// <summary>Converts raw little-endian elements of <paramref name="type"/> to float32 exactly.</summary>
    public static void ToFloat32(ReadOnlySpan<byte> source, FloatType type, Span<float> destination)
    {
        int n = source.Length / type.Size();
        if (destination.Length < n) throw new ArgumentException("destination too small", nameof(destination));
        switch (type)
        {
            case FloatType.Float32:
                System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(source)[..n].CopyTo(destination);
                break;
            case FloatType.BFloat16:
                var bf = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ushort>(source);
                var bits = System.Runtime.InteropServices.MemoryMarshal.Cast<float, uint>(destination);
                int i0 = 0;
                if (System.Numerics.Vector.IsHardwareAccelerated)
                {
                    // Widening a bf16 is a 16-bit shift of its bits; exact.
                    for (; i0 + System.Numerics.Vector<ushort>.Count <= n; i0 += System.Numerics.Vector<ushort>.Count)
                    {
                        System.Numerics.Vector.Widen(new System.Numerics.Vector<ushort>(bf[i0..]), out var lo, out var hi);
                        (lo << 16).CopyTo(bits[i0..]);
                        (hi << 16).CopyTo(bits[(i0 + System.Numerics.Vector<uint>.Count)..]);
                    }
                }
                for (int i = i0; i < n; i++) destination[i] = BFloat16.ToFloat(bf[i]);
                break;
            default:
                var h = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, Half>(source);
                for (int i = 0; i < n; i++) destination[i] = (float)h[i];
                break;
        }
    }

    /// <summary>Writes float32 values as <paramref name="type"/>, rounding to nearest even.</summary>
    public static void FromFloat32(ReadOnlySpan<float> source, FloatType type, Span<byte> destination)
    {
        if (destination.Length < source.Length * type.Size()) throw new ArgumentException("destination too small", nameof(destination));
        switch (type)
        {
            case FloatType.Float32:
                System.Runtime.InteropServices.MemoryMarshal.AsBytes(source).CopyTo(destination);
                break;
            case FloatType.BFloat16:
                var bf = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ushort>(destination);
                for (int i = 0; i < source.Length; i++) bf[i] = BFloat16.FromFloat(source[i]);
                break;
            default:
                var h = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, Half>(destination);
                for (int i = 0; i < source.Length; i++) h[i] = (Half)source[i];
                break;
        }
    }
}
