namespace QLora.Quant.Gguf;

/// <summary>
/// One GGUF metadata value: a scalar (held as the matching .NET type), a string, or an array of scalars or strings
/// (held as a .NET array of the element type). The factories pick the GGUF type llama.cpp expects for each key kind.
/// </summary>
public sealed record GgufValue
{
    private GgufValue(GgufValueType type, object value, GgufValueType elementType = GgufValueType.UInt8)
    {
        Type = type;
        Value = value;
        ElementType = elementType;
    }

    /// <summary>The value's type tag.</summary>
    public GgufValueType Type { get; }

    /// <summary>The value: byte, sbyte, ushort, short, uint, int, float, bool, string, ulong, long, double, or an array of one of those.</summary>
    public object Value { get; }

    /// <summary>For arrays, the element type.</summary>
    public GgufValueType ElementType { get; }

    /// <summary>A uint8 value.</summary>
    public static GgufValue UInt8(byte v) => new(GgufValueType.UInt8, v);
    /// <summary>An int8 value.</summary>
    public static GgufValue Int8(sbyte v) => new(GgufValueType.Int8, v);
    /// <summary>A uint16 value.</summary>
    public static GgufValue UInt16(ushort v) => new(GgufValueType.UInt16, v);
    /// <summary>An int16 value.</summary>
    public static GgufValue Int16(short v) => new(GgufValueType.Int16, v);
    /// <summary>A uint32 value (llama.cpp's type for counts, lengths and token ids).</summary>
    public static GgufValue UInt32(uint v) => new(GgufValueType.UInt32, v);
    /// <summary>An int32 value.</summary>
    public static GgufValue Int32(int v) => new(GgufValueType.Int32, v);
    /// <summary>A float32 value (llama.cpp's type for epsilons, RoPE bases and factors).</summary>
    public static GgufValue Float32(float v) => new(GgufValueType.Float32, v);
    /// <summary>A bool value.</summary>
    public static GgufValue Bool(bool v) => new(GgufValueType.Bool, v);
    /// <summary>A string value.</summary>
    public static GgufValue String(string v) => new(GgufValueType.String, v ?? throw new ArgumentNullException(nameof(v)));
    /// <summary>A uint64 value.</summary>
    public static GgufValue UInt64(ulong v) => new(GgufValueType.UInt64, v);
    /// <summary>An int64 value.</summary>
    public static GgufValue Int64(long v) => new(GgufValueType.Int64, v);
    /// <summary>A float64 value.</summary>
    public static GgufValue Float64(double v) => new(GgufValueType.Float64, v);

    /// <summary>An array of strings (token strings, merges).</summary>
    public static GgufValue Strings(string[] v) => Arr(GgufValueType.String, v);
    /// <summary>An array of int32 (token types).</summary>
    public static GgufValue Int32s(int[] v) => Arr(GgufValueType.Int32, v);
    /// <summary>An array of uint32.</summary>
    public static GgufValue UInt32s(uint[] v) => Arr(GgufValueType.UInt32, v);
    /// <summary>An array of float32 (token scores).</summary>
    public static GgufValue Float32s(float[] v) => Arr(GgufValueType.Float32, v);
    /// <summary>An array of any scalar element type, given as the matching .NET array (for readers and tests).</summary>
    public static GgufValue Array(GgufValueType elementType, System.Array v) => Arr(elementType, v);

    private static GgufValue Arr(GgufValueType elementType, System.Array v)
    {
        ArgumentNullException.ThrowIfNull(v);
        if (elementType == GgufValueType.Array) throw new ArgumentException("nested arrays are not written", nameof(elementType));
        var expected = ClrType(elementType);
        if (v.GetType().GetElementType() != expected) throw new ArgumentException($"a {elementType} array must be a {expected.Name}[]", nameof(v));
        return new GgufValue(GgufValueType.Array, v, elementType);
    }

    internal static Type ClrType(GgufValueType t) => t switch
    {
        GgufValueType.UInt8 => typeof(byte),
        GgufValueType.Int8 => typeof(sbyte),
        GgufValueType.UInt16 => typeof(ushort),
        GgufValueType.Int16 => typeof(short),
        GgufValueType.UInt32 => typeof(uint),
        GgufValueType.Int32 => typeof(int),
        GgufValueType.Float32 => typeof(float),
        GgufValueType.Bool => typeof(bool),
        GgufValueType.String => typeof(string),
        GgufValueType.UInt64 => typeof(ulong),
        GgufValueType.Int64 => typeof(long),
        GgufValueType.Float64 => typeof(double),
        _ => throw new ArgumentOutOfRangeException(nameof(t), t, "not a scalar GGUF type"),
    };

    /// <summary>The value as a string (throws for other types).</summary>
    public string AsString() => (string)Value;

    /// <summary>The integer value of any integer type, widened.</summary>
    public long AsInt64() => Value switch
    {
        byte b => b, sbyte sb => sb, ushort us => us, short s => s, uint u => u, int i => i, ulong ul => checked((long)ul), long l => l,
        _ => throw new InvalidCastException($"GGUF {Type} is not an integer"),
    };

    /// <summary>The array's elements (throws for scalars).</summary>
    public T[] AsArray<T>() => (T[])Value;
}
