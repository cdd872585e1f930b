using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>SwiGLU feed-forward (HF: <c>mlp</c> with gate/up/down_proj): down(silu(gate(x)) · up(x)).</summary>
public sealed class LlamaMlp : SwappableModule
{
    private readonly Dictionary<string, nn.Module<Tensor, Tensor>> _proj = new(StringComparer.Ordinal);

    /// <summary>Takes the three projections.</summary>
    public LlamaMlp(nn.Module<Tensor, Tensor> gate, nn.Module<Tensor, Tensor> up, nn.Module<Tensor, Tensor> down) : base("LlamaMlp")
    {
        foreach (var (name, m) in new[] { ("gate_proj", gate), ("up_proj", up), ("down_proj", down) })
        {
            _proj[name] = m;
            register_module(name, m);
        }
    }

    /// <summary>A projection by HF name.</summary>
    public nn.Module<Tensor, Tensor> Projection(string name) => _proj[name];

    /// <summary>Replaces a projection.</summary>
    public void ReplaceProjection(string name, nn.Module<Tensor, Tensor> module)
    {
        Swap(name, module);
        _proj[name] = module;
    }

    /// <summary>down(silu(gate(x)) · up(x)).</summary>
    public Tensor Forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var g = nn.functional.silu(_proj["gate_proj"].forward(x));
        var u = _proj["up_proj"].forward(x);
        return _proj["down_proj"].forward(g * u).MoveToOuterDisposeScope();
    }
}
