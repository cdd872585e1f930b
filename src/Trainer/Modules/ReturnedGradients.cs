using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// The input gradients a custom autograd node's backward returns are TorchSharp handles registered in the dispose scope
/// open at that moment (inside a checkpoint: the recompute's, until the layer's backward ends), which would hold their
/// storage long after autograd has used them. Autograd takes its own reference as soon as the callback returns, so the
/// handles are kept here and dropped when the next such backward on this thread starts (the nodes that keep theirs here:
/// the tiled norm and attention by group; a frozen 4-bit projection's backward also drops them, so attention's q, k and v
/// gradients go as soon as RoPE's backward has used them, as the planner counts them).
/// </summary>
internal static class ReturnedGradients
{
    [ThreadStatic] private static List<Tensor>? _last;

    /// <summary>Drops the handles the previous backward returned (call first in a backward).</summary>
    public static void Release()
    {
        if (_last is null) return;
        foreach (var t in _last) t?.Dispose();
        _last.Clear();
    }

    /// <summary>Keeps <paramref name="gradients"/>' handles until the next <see cref="Release"/>, and returns them.</summary>
    public static List<Tensor> Keep(List<Tensor> gradients)
    {
        (_last ??= []).AddRange(gradients.Where(g => g is not null));
        return gradients;
    }
}
