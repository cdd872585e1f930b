using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>SwiGLU feed-forward (HF: <c>mlp</c> with gate/up/down_proj): down(silu(gate(x)) · up(x)).</summary>
public sealed class LlamaMlp : ProjectionHost
{
    /// <summary>Takes the three projections.</summary>
    public LlamaMlp(nn.Module<Tensor, Tensor> gate, nn.Module<Tensor, Tensor> up, nn.Module<Tensor, Tensor> down) : base("LlamaMlp")
    {
        foreach (var (name, m) in new[] { ("gate_proj", gate), ("up_proj", up), ("down_proj", down) }) AddProjection(name, m);
    }

    /// <summary>down(silu(gate(x)) · up(x)).</summary>
    public Tensor Forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var g = nn.functional.silu(Projection("gate_proj").forward(x));
        var u = Projection("up_proj").forward(x);
        return Projection("down_proj").forward(g * u).MoveToOuterDisposeScope();
    }
}
