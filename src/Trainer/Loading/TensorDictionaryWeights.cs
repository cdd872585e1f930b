using QLora.Quant;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>Model weights from dense tensors in memory (tests, benchmarks, random models).</summary>
public sealed class TensorDictionaryWeights(Func<string, Tensor?> lookup) : IModelWeights
{
    /// <inheritdoc />
    public bool Contains(string name) => lookup(name) is not null;

    /// <inheritdoc />
    public long[] Shape(string name) => Dense(name).shape;

    /// <inheritdoc />
    /// <remarks>Returns a new handle to the caller's tensor, so disposing it leaves the caller's tensor alive.</remarks>
    public Tensor Dense(string name) => (lookup(name) ?? throw new ArgumentException($"missing weight {name}")).alias();

    /// <inheritdoc />
    public QuantizedTensor FourBit(string name, QuantType quantType, int blocksize, bool doubleQuant)
    {
        using var t = Dense(name);
        return Linear4bit.QuantizeWeight(t, quantType, blocksize, doubleQuant);
    }
}
