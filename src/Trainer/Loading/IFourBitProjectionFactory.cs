using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Builds a model's frozen 4-bit projections some other way than copying them out of <see cref="IModelWeights"/>:
/// streamed from a memory-mapped checkpoint (<see cref="LayerStreamer"/>), or generated (benchmarks).
/// </summary>
public interface IFourBitProjectionFactory
{
    /// <summary>The projection whose weight is <paramref name="weightName"/> [out, in] = <paramref name="shape"/>, with an optional frozen bias.</summary>
    Linear4bit Create(string weightName, long[] shape, Tensor? bias, ScalarType computeDType);
}
