using QLora.Quant;

namespace QLora.Trainer;

/// <summary>
/// Where one bnb 4-bit weight of a streamed layer lives: its tensors in the memory-mapped checkpoint (host) and the
/// offsets of their copies inside the layer's resident buffer (device), plus what decoding needs. Immutable.
/// </summary>
public sealed class StreamedFourBitWeight
{
    private readonly (string Key, long Offset, long Bytes)[] _parts;

    internal StreamedFourBitWeight(StreamedLayerWeights layer, string name, QuantState state, (string Key, long Offset, long Bytes)[] parts,
        bool doubleQuant, float offset, int nestedBlocksize)
    {
        Layer = layer;
        Name = name;
        State = state;
        _parts = parts;
        IsDoubleQuantized = doubleQuant;
        NestedOffset = offset;
        NestedBlocksize = nestedBlocksize;
    }

    /// <summary>The layer this weight is streamed with.</summary>
    public StreamedLayerWeights Layer { get; }
    /// <summary>The weight's checkpoint key (e.g. <c>model.layers.3.mlp.up_proj.weight</c>).</summary>
    public string Name { get; }
    /// <summary>Quant type, blocksize, original dtype and shape (the absmax arrays are left empty: they stay on disk).</summary>
    public QuantState State { get; }
    /// <summary>True when the absmax is double-quantized.</summary>
    public bool IsDoubleQuantized { get; }
    /// <summary>The double-quantization offset (0 when not double-quantized).</summary>
    public float NestedOffset { get; }
    /// <summary>Absmax codes per nested block (0 when not double-quantized).</summary>
    public int NestedBlocksize { get; }
    /// <summary>Bytes the weight takes when resident (packed codes, absmax and nested parts, unpadded).</summary>
    public long Bytes => _parts.Sum(p => p.Bytes);

    /// <summary>The checkpoint tensors copied in and the offset of each copy in the layer buffer.</summary>
    internal IReadOnlyList<(string Key, long Offset, long Bytes)> Parts => _parts;

    /// <summary>Addresses of the resident copy whose buffer starts at <paramref name="layerBase"/>.</summary>
    internal FourBitPointers Pointers(nint layerBase) => new()
    {
        Packed = layerBase + (nint)_parts[0].Offset,
        Count = State.Count,
        Blocksize = State.Blocksize,
        QuantType = State.QuantType,
        Absmax = IsDoubleQuantized ? 0 : layerBase + (nint)_parts[1].Offset,
        AbsmaxCodes = IsDoubleQuantized ? layerBase + (nint)_parts[1].Offset : 0,
        NestedAbsmax = IsDoubleQuantized ? layerBase + (nint)_parts[2].Offset : 0,
        NestedMap = IsDoubleQuantized ? layerBase + (nint)_parts[3].Offset : 0,
        Offset = NestedOffset,
        NestedBlocksize = NestedBlocksize,
    };
}

/// <summary>
/// The 4-bit weights of one decoder layer as a streaming unit: they are copied from the memory-mapped checkpoint into
/// one resident buffer together, and released together. Created by <see cref="LayerStreamer"/>, which also owns the
/// residency state.
/// </summary>
public sealed class StreamedLayerWeights
{
    private const long Alignment = 64;
    private readonly List<StreamedFourBitWeight> _weights = [];

    internal StreamedLayerWeights(LayerStreamer streamer, int index)
    {
        Streamer = streamer;
        Index = index;
    }

    /// <summary>The streamer that brings this layer in and out.</summary>
    public LayerStreamer Streamer { get; }
    /// <summary>The decoder layer's index.</summary>
    public int Index { get; }
    /// <summary>The layer's 4-bit weights.</summary>
    public IReadOnlyList<StreamedFourBitWeight> Weights => _weights;
    /// <summary>Size of the resident buffer (every part of every weight, each aligned to 64 bytes).</summary>
    public long Bytes { get; private set; }

    // Residency, guarded by the streamer's lock.
    internal nint Buffer;
    internal Task? Loading;

    /// <summary>Adds the bnb 4-bit weight <paramref name="key"/> of <paramref name="source"/>, validating its parts.</summary>
    internal StreamedFourBitWeight Add(ITensorSource source, string key)
    {
        var f = BnbCheckpointLayout.ReadFields(source, key, out var stateKey);
        var state = new QuantState { QuantType = f.QuantType, Blocksize = f.Blocksize, DType = f.DType, Shape = f.Shape, Absmax = [] };
        QuantTypes.ValidateBlocksize(f.Blocksize);
        long blocks = state.BlockCount;
        var parts = new List<(string, long, long)>();
        void Part(string name, long bytes, TensorDType? dtype)
        {
            if (!source.Contains(name)) throw new FormatException($"{key}: missing {name}");
            var info = source.GetInfo(name);
            if (dtype is { } d && info.DType != d) throw new FormatException($"{name}: dtype {info.DType}, expected {d}");
            if (info.ByteLength < bytes) throw new FormatException($"{name}: {info.ByteLength} bytes, expected {bytes} for shape [{string.Join(", ", f.Shape)}]");
            parts.Add((name, Bytes, bytes));
            Bytes += (bytes + Alignment - 1) / Alignment * Alignment;
        }
        Part(key, state.PackedBytes, null); // any quant_storage dtype: the bytes are the same
        float offset = 0;
        int nestedBlocksize = 0;
        if (f.NestedOffset is { } o)
        {
            if (f.NestedDType is not null && f.NestedDType != "float32")
                throw new FormatException($"{stateKey}: nested_dtype {f.NestedDType} is not supported (float32 only)");
            offset = o;
            nestedBlocksize = f.NestedBlocksize ?? DoubleQuantizer.NestedBlocksize;
            Part($"{key}.absmax", blocks, TensorDType.U8);
            Part($"{key}.nested_absmax", 4 * ((blocks + nestedBlocksize - 1) / nestedBlocksize), TensorDType.F32);
            Part($"{key}.nested_quant_map", 4 * 256, TensorDType.F32);
        }
        else
        {
            Part($"{key}.absmax", 4 * blocks, TensorDType.F32);
        }
        var weight = new StreamedFourBitWeight(this, key, state, [.. parts], f.NestedOffset is not null, offset, nestedBlocksize);
        _weights.Add(weight);
        return weight;
    }
}
