using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// SwiGLU feed-forward (HF: <c>mlp</c> with gate/up/down_proj): down(silu(gate(x)) · up(x)); Gemma's GeGLU uses GELU with
/// the tanh approximation (gelu_pytorch_tanh) in place of silu. With <see cref="TileTokens"/> it runs in sequence
/// tiles, each checkpointed on its own, so no [tokens, intermediate] tensor of the whole sequence exists, forward or
/// backward: what makes a long context fit (the MLP acts on each token alone, so the tiles give the same result up to
/// the summation order of the LoRA gradients).
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

    /// <summary>Tokens per tile (0: the whole sequence at once); a tile is recomputed in backward from its input alone.</summary>
    public int TileTokens { get; set; }

    /// <summary>down(act(gate(x)) · up(x)), in tiles of <see cref="TileTokens"/> tokens when set and the input is longer.</summary>
    public Tensor Forward(Tensor x)
    {
        long width = x.shape[^1], tokens = x.numel() / Math.Max(1, width);
        if (TileTokens <= 0 || tokens <= TileTokens) return Untiled(x);
        using var scope = NewDisposeScope();
        using var flat = x.reshape(-1, width);
        var parts = new List<Tensor>();
        for (long start = 0; start < tokens; start += TileTokens)
        {
            using var tile = flat.narrow(0, start, Math.Min(TileTokens, tokens - start));
            parts.Add(Checkpoint.Run((t, _) => Untiled(t), tile)); // without grad (the first forward) simply the tile
        }
        var y = cat(parts, 0);
        foreach (var p in parts) p.Dispose();
        return y.view(x.shape[..^1].Append(y.shape[^1]).ToArray()).MoveToOuterDisposeScope();
    }

    /// <summary>down(silu(gate(x)) · up(x)); each [tokens, intermediate] temporary is dropped as soon as it is used.</summary>
    private Tensor Untiled(Tensor x)
    {
        using var scope = NewDisposeScope();
        Tensor g, product;
        using (var gate = Projection("gate_proj").forward(x))
            g = GeluTanh ? nn.functional.gelu(gate, TorchSharp.Modules.GELU.Approximate.tanh) : nn.functional.silu(gate);
        using (g)
        using (var u = Projection("up_proj").forward(x))
            product = g * u;
        using (product) return Projection("down_proj").forward(product).MoveToOuterDisposeScope();
    }
}
