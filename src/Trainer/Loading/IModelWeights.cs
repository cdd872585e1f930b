using QLora.Quant;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>Where a model's weights come from, by Hugging Face name: dense tensors, or 4-bit weights stored as such.</summary>
public interface IModelWeights
{
    /// <summary>True if a tensor (dense or 4-bit) of that name exists.</summary>
    bool Contains(string name);

    /// <summary>The shape the source records for <paramref name="name"/> (the original shape for a 4-bit weight).</summary>
    long[] Shape(string name);

    /// <summary>True if <paramref name="name"/> is stored as a 4-bit weight (a bnb-4bit checkpoint); false for dense sources.</summary>
    bool IsFourBit(string name) => false;

    /// <summary>A dense CPU tensor (its stored float dtype) for a tensor stored densely.</summary>
    Tensor Dense(string name);

    /// <summary>The weight as NF4/FP4: the stored one for a pre-quantized checkpoint, else quantized now from the dense values.</summary>
    QuantizedTensor FourBit(string name, QuantType quantType, int blocksize, bool doubleQuant);
}
