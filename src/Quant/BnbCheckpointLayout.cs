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

    /// <summary>The name, dtype and shape of one stored tensor.</summary>
    public sealed record Slot(string Name, TensorDType DType, long[] Shape)
    {
        /// <summary>Bytes the tensor occupies.</summary>
        public long ByteLength => checked(TensorShape.ElementCount(Shape) * DType.Size());
    }

    /// <summary>
    /// The tensors bitsandbytes writes for a weight with this state, in its order, without their data: lets a streaming
    /// writer lay out a file before quantizing (the JSON's length depends only on the state's scalars).
    /// </summary>
    public static IReadOnlyList<Slot> Describe(string weightKey, QuantState state, out byte[] quantStateJson)
    {
        quantStateJson = Encoding.UTF8.GetBytes(BnbQuantStateJson.Serialize(state));
        long n = state.Count, blocks = state.BlockCount;
        var slots = new List<Slot> { new(weightKey, TensorDType.U8, [(n + 1) / 2, 1]) };
        if (state.Nested is { } nested)
        {
            slots.Add(new($"{weightKey}.absmax", TensorDType.U8, [blocks]));
            slots.Add(new($"{weightKey}.quant_map", TensorDType.F32, [16]));
            slots.Add(new($"{weightKey}.nested_absmax", TensorDType.F32, [(blocks + nested.Blocksize - 1) / nested.Blocksize]));
            slots.Add(new($"{weightKey}.nested_quant_map", TensorDType.F32, [256]));
        }
        else
        {
            slots.Add(new($"{weightKey}.absmax", TensorDType.F32, [blocks]));
            slots.Add(new($"{weightKey}.quant_map", TensorDType.F32, [16]));
        }
        slots.Add(new(QuantStateKey(weightKey, state.QuantType), TensorDType.U8, [quantStateJson.LongLength]));
        return slots;
    }

    /// <summary>The tensors bitsandbytes writes for <paramref name="weightKey"/>, in its order.</summary>
    public static IReadOnlyList<Entry> ToEntries(string weightKey, QuantizedTensor tensor) =>
        [new Entry(weightKey, TensorDType.U8, [tensor.Packed.LongLength, 1], tensor.Packed), .. StateEntries(weightKey, tensor.State)];

    /// <summary>
    /// The tensors of <see cref="ToEntries"/> after the packed codes (absmax, maps, nested absmax, quant-state JSON), for
    /// writers that hold the packed codes elsewhere (e.g. generated straight into a native buffer).
    /// </summary>
    public static IReadOnlyList<Entry> StateEntries(string weightKey, QuantState s)
    {
        var slots = Describe(weightKey, s, out var json);
        var data = new List<byte[]> { Array.Empty<byte>() };
        if (s.Nested is { } nested)
        {
            data.Add(nested.Codes);
            data.Add(FloatBytes(s.QuantType.Table()));
            data.Add(FloatBytes(nested.Absmax));
            data.Add(FloatBytes(nested.Map));
        }
        else
        {
            data.Add(FloatBytes(s.Absmax!));
            data.Add(FloatBytes(s.QuantType.Table()));
        }
        data.Add(json);
        return slots.Skip(1).Select((slot, i) => new Entry(slot.Name, slot.DType, slot.Shape, data[i + 1])).ToList();
    }

    /// <summary>
    /// Reads the 4-bit weight stored under <paramref name="weightKey"/>, whatever its blocksize, quant type, double
    /// quantization or <c>quant_storage</c> dtype; throws <see cref="FormatException"/> naming the key and the problem.
    /// </summary>
    public static QuantizedTensor Read(ITensorSource source, string weightKey)
    {
        var f = ReadFields(source, weightKey, out var stateKey);
        long n = TensorShape.ElementCount(f.Shape);
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

    /// <summary>The parsed quant-state JSON of <paramref name="weightKey"/>; throws <see cref="FormatException"/> naming the key.</summary>
    public static BnbQuantStateJson.Fields ReadFields(ITensorSource source, string weightKey, out string stateKey)
    {
        string? key = null;
        foreach (var t in new[] { QuantType.Nf4, QuantType.Fp4 })
            if (source.Contains(QuantStateKey(weightKey, t))) key = QuantStateKey(weightKey, t);
        stateKey = key ?? throw new FormatException($"{weightKey}: no quant_state.bitsandbytes__nf4/fp4 tensor, so it is not a bnb 4-bit weight");
        BnbQuantStateJson.Fields f;
        try { f = BnbQuantStateJson.Parse(source.ReadBytes(key)); }
        catch (FormatException e) { throw new FormatException($"{key}: {e.Message}", e); }
        if (!key.EndsWith(f.QuantType.Name(), StringComparison.Ordinal))
            throw new FormatException($"{key}: its JSON says quant_type {f.QuantType.Name()}");
        return f;
    }

    private static float[] ReadFloats(ITensorSource source, string key)
    {
        var info = source.GetInfo(key);
        if (info.DType != TensorDType.F32) throw new FormatException($"{key}: dtype {info.DType}, expected F32");
        return MemoryMarshal.Cast<byte, float>(source.ReadBytes(key)).ToArray();
    }

    private static byte[] FloatBytes(ReadOnlySpan<float> values) => MemoryMarshal.AsBytes(values).ToArray();
}
