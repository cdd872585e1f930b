using System.Runtime.InteropServices;
using System.Text;

namespace QLora.Quant;

/// <summary>
/// How a bitsandbytes 4-bit Linear weight is stored in a transformers safetensors checkpoint (spec §5): the packed
/// codes under the weight's own name plus <c>.absmax</c>, <c>.quant_map</c>, <c>.nested_absmax</c>,
/// <c>.nested_quant_map</c> and the <c>.quant_state.bitsandbytes__nf4</c> JSON.
/// </summary>
public static class BnbCheckpointLayout
{
    /// <summary>One tensor to write: name, dtype, shape and bytes.</summary>
    public sealed record Entry(string Name, TensorDType DType, long[] Shape, byte[] Data);

    /// <summary>The key of the quant-state JSON tensor for a weight key such as <c>P.weight</c>.</summary>
    public static string QuantStateKey(string weightKey, QuantType type) => $"{weightKey}.quant_state.bitsandbytes__{type.Name()}";

    /// <summary>True if <paramref name="weightKey"/> is stored as a bnb 4-bit weight in <paramref name="source"/>.</summary>
    public static bool IsQuantized(ITensorSource source, string weightKey) =>
        source.Contains(QuantStateKey(weightKey, QuantType.Nf4)) || source.Contains(QuantStateKey(weightKey, QuantType.Fp4));

    /// <summary>True if a tensor name is one of the auxiliary tensors of a 4-bit weight (not a weight of its own).</summary>
    public static bool IsAuxiliaryKey(string name) =>
        name.EndsWith(".absmax", StringComparison.Ordinal) || name.EndsWith(".quant_map", StringComparison.Ordinal) ||
        name.EndsWith(".nested_absmax", StringComparison.Ordinal) || name.EndsWith(".nested_quant_map", StringComparison.Ordinal) ||
        name.Contains(".quant_state.bitsandbytes__", StringComparison.Ordinal);

    /// <summary>The tensors bitsandbytes writes for <paramref name="weightKey"/>, in its order.</summary>
    public static IReadOnlyList<Entry> ToEntries(string weightKey, QuantizedTensor tensor)
    {
        var s = tensor.State;
        var entries = new List<Entry>
        {
            new(weightKey, TensorDType.U8, [tensor.Packed.LongLength, 1], tensor.Packed),
        };
        if (s.Nested is { } nested)
        {
            entries.Add(new($"{weightKey}.absmax", TensorDType.U8, [nested.Codes.LongLength], nested.Codes));
            entries.Add(new($"{weightKey}.quant_map", TensorDType.F32, [16], FloatBytes(s.QuantType.Table())));
            entries.Add(new($"{weightKey}.nested_absmax", TensorDType.F32, [nested.Absmax.LongLength], FloatBytes(nested.Absmax)));
            entries.Add(new($"{weightKey}.nested_quant_map", TensorDType.F32, [nested.Map.Length], FloatBytes(nested.Map)));
        }
        else
        {
            entries.Add(new($"{weightKey}.absmax", TensorDType.F32, [s.Absmax!.LongLength], FloatBytes(s.Absmax)));
            entries.Add(new($"{weightKey}.quant_map", TensorDType.F32, [16], FloatBytes(s.QuantType.Table())));
        }
        var json = Encoding.UTF8.GetBytes(BnbQuantStateJson.Serialize(s));
        entries.Add(new(QuantStateKey(weightKey, s.QuantType), TensorDType.U8, [json.LongLength], json));
        return entries;
    }

    /// <summary>
    /// Reads the 4-bit weight stored under <paramref name="weightKey"/>, whatever its blocksize, quant type, double
    /// quantization or <c>quant_storage</c> dtype; throws <see cref="FormatException"/> naming the key and the problem.
    /// </summary>
    public static QuantizedTensor Read(ITensorSource source, string weightKey)
    {
        string? stateKey = null;
        foreach (var t in new[] { QuantType.Nf4, QuantType.Fp4 })
            if (source.Contains(QuantStateKey(weightKey, t))) stateKey = QuantStateKey(weightKey, t);
        if (stateKey is null) throw new FormatException($"{weightKey}: no quant_state.bitsandbytes__nf4/fp4 tensor, so it is not a bnb 4-bit weight");

        BnbQuantStateJson.Fields f;
        try { f = BnbQuantStateJson.Parse(source.ReadBytes(stateKey)); }
        catch (FormatException e) { throw new FormatException($"{stateKey}: {e.Message}", e); }
        if (!stateKey.EndsWith(f.QuantType.Name(), StringComparison.Ordinal))
            throw new FormatException($"{stateKey}: its JSON says quant_type {f.QuantType.Name()}");

        long n = 1;
        foreach (var d in f.Shape) n = checked(n * d);
        long packedBytes = (n + 1) / 2;
        var packedRaw = source.ReadBytes(weightKey); // any quant_storage dtype: the bytes are the same
        if (packedRaw.LongLength < packedBytes)
            throw new FormatException($"{weightKey}: {packedRaw.LongLength} bytes of packed codes, expected {packedBytes} for shape [{string.Join(", ", f.Shape)}]");
        var packed = packedRaw.LongLength == packedBytes ? packedRaw : packedRaw.AsSpan(0, (int)packedBytes).ToArray();

        string absmaxKey = $"{weightKey}.absmax";
        if (!source.Contains(absmaxKey)) throw new FormatException($"{weightKey}: missing {absmaxKey}");
        var absmaxInfo = source.GetInfo(absmaxKey);
        QuantState state;
        if (f.NestedOffset is { } offset)
        {
            if (absmaxInfo.DType != TensorDType.U8) throw new FormatException($"{absmaxKey}: dtype {absmaxInfo.DType}, expected U8 codes with double quantization");
            string nestedKey = $"{weightKey}.nested_absmax", mapKey = $"{weightKey}.nested_quant_map";
            foreach (var k in new[] { nestedKey, mapKey })
                if (!source.Contains(k)) throw new FormatException($"{weightKey}: double-quantized but {k} is missing");
            if (f.NestedDType is not null && f.NestedDType != "float32")
                throw new FormatException($"{stateKey}: nested_dtype {f.NestedDType} is not supported (float32 only)");
            state = new QuantState
            {
                QuantType = f.QuantType, Blocksize = f.Blocksize, DType = f.DType, Shape = f.Shape,
                Nested = new NestedAbsmax
                {
                    Codes = source.ReadBytes(absmaxKey),
                    Absmax = ReadFloats(source, nestedKey),
                    Map = ReadFloats(source, mapKey),
                    Offset = offset,
                    Blocksize = f.NestedBlocksize ?? DoubleQuantizer.NestedBlocksize,
                },
            };
        }
        else
        {
            state = new QuantState
            {
                QuantType = f.QuantType, Blocksize = f.Blocksize, DType = f.DType, Shape = f.Shape,
                Absmax = ReadFloats(source, absmaxKey),
            };
        }
        try { return new QuantizedTensor(packed, state); }
        catch (Exception e) when (e is FormatException or ArgumentException)
        {
            throw new FormatException($"{weightKey}: {e.Message}", e);
        }
    }

    private static float[] ReadFloats(ITensorSource source, string key)
    {
        var info = source.GetInfo(key);
        if (info.DType != TensorDType.F32) throw new FormatException($"{key}: dtype {info.DType}, expected F32");
        return MemoryMarshal.Cast<byte, float>(source.ReadBytes(key)).ToArray();
    }

    private static byte[] FloatBytes(ReadOnlySpan<float> values) => MemoryMarshal.AsBytes(values).ToArray();
}
