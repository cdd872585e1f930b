using TorchSharp.Modules;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>A frozen token embedding (HF: <c>embed_tokens.weight</c> [vocab, hidden]): a row lookup, no gradient.</summary>
public sealed class FrozenEmbedding : FrozenWeightModule
{
    /// <summary>Wraps a [vocab, hidden] matrix.</summary>
    public FrozenEmbedding(Tensor weight) : base("Embedding", weight)
    {
    }

    /// <summary>Rows of <see cref="FrozenWeightModule.weight"/> for token ids of any shape; result shape = ids shape + [hidden].</summary>
    public override Tensor forward(Tensor ids)
    {
        long vocab = weight.shape[0];
        using var scope = NewDisposeScope();
        var flat = ids.reshape(-1);
        if (flat.numel() > 0)
        {
            long max = flat.max().item<long>(), min = flat.min().item<long>();
            if (min < 0 || max >= vocab) throw new ArgumentOutOfRangeException(nameof(ids), $"token id {(min < 0 ? min : max)} is outside the vocabulary of {vocab}");
        }
        var rows = weight.index_select(0, flat);
        var shape = ids.shape.Append(weight.shape[1]).ToArray();
        return rows.view(shape).MoveToOuterDisposeScope();
    }
}
