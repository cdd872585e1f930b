using QLora.Quant;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Model weights read tensor by tensor from a memory-mapped (possibly sharded) safetensors checkpoint: dense tensors are
/// copied once into a torch tensor; 4-bit weights are either read as stored (bnb-4bit checkpoints, any blocksize, quant
/// type, double quant or quant_storage) or quantized straight from the mapped bytes, so no 16-bit copy of the model exists.
/// </summary>
public sealed class SafetensorsModelWeights(SafetensorsCheckpoint checkpoint) : IModelWeights
{
    /// <inheritdoc />
    public bool Contains(string name) => checkpoint.Contains(name);

    /// <inheritdoc />
    public bool IsFourBit(string name) => BnbCheckpointLayout.IsQuantized(checkpoint, name);

    /// <inheritdoc />
    public long[] Shape(string name) => BnbCheckpointLayout.IsQuantized(checkpoint, name)
        ? BnbCheckpointLayout.ReadFields(checkpoint, name, out _).Shape
        : checkpoint.GetInfo(name).Shape;

    /// <inheritdoc />
    public Tensor Dense(string name)
    {
        if (BnbCheckpointLayout.IsQuantized(checkpoint, name))
            throw new InvalidDataException($"{name} is stored 4-bit; only projection weights may be quantized in a bnb-4bit checkpoint");
        var info = checkpoint.GetInfo(name);
        return TorchDTypes.FromBytes(info.ByteLength > 0 ? checkpoint.GetSpan(name) : default, info);
    }

    /// <inheritdoc />
    public QuantizedTensor FourBit(string name, QuantType quantType, int blocksize, bool doubleQuant)
    {
        if (BnbCheckpointLayout.IsQuantized(checkpoint, name)) return BnbCheckpointLayout.Read(checkpoint, name);
        var info = checkpoint.GetInfo(name);
        var floatType = FloatTypes.FromTensorDType(info.DType)
            ?? throw new InvalidDataException($"{name} has dtype {info.DType}; only F32, BF16 or F16 weights can be quantized");
        return FourBitQuantizer.Quantize(checkpoint.GetSpan(name), floatType, info.Shape, quantType, blocksize, doubleQuant);
    }
}
