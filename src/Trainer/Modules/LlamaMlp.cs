using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// SwiGLU feed-forward (HF: <c>mlp</c> with gate/up/down_proj): down(silu(gate(x)) · up(x)); Gemma's GeGLU uses GELU with
/// the tanh approximation (gelu_pytorch_tanh) in place of silu.
/// </summary>
public sealed class LlamaMlp : ProjectionHost
{
    /// <summary>Takes the three projections.</summary>
    public LlamaMlp(nn.Module<Tensor, Tensor> gate, nn.Module<Tensor, Tensor> up, nn.Module<Tensor, Tensor> down) : base("LlamaMlp")
    {
        foreach (var (name, m) in new[] { ("gate_proj", gate), ("up_proj", up), ("down_proj", down) }) AddProjection(name, m);
    }

    /// <summary>As the SwiGLU constructor; <paramref name="geluTanh"/> makes it Gemma's GeGLU.</summary>
    public LlamaMlp(nn.Module<Tensor, Tensor> gate, nn.Module<Tensor, Tensor> up, nn.Module<Tensor, Tensor> down, bool geluTanh) : this(gate, up, down)
        => GeluTanh = geluTanh;

    /// <summary>GeGLU with tanh-approximated GELU (Gemma) instead of SwiGLU.</summary>
    public bool GeluTanh { get; }

    /// <summary>down(silu(gate(x)) · up(x)).</summary>
    public Tensor Forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var gate = Projection("gate_proj").forward(x);
        var g = GeluTanh ? nn.functional.gelu(gate, TorchSharp.Modules.GELU.Approximate.tanh) : nn.functional.silu(gate);
        var u = Projection("up_proj").forward(x);
        return Projection("down_proj").forward(g * u).MoveToOuterDisposeScope();
    }
}
