using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// A module that owns named linear projections (attention's q/k/v/o, the MLP's gate/up/down) and can swap one in place,
/// keeping its Hugging Face name, e.g. to wrap it with a <see cref="LoraLinear"/>.
/// </summary>
public abstract class ProjectionHost : nn.Module
{
    private readonly Dictionary<string, nn.Module<Tensor, Tensor>> _projections = new(StringComparer.Ordinal);

    /// <summary>Names the module.</summary>
    protected ProjectionHost(string name) : base(name) { }

    /// <summary>Registers a projection under its HF name.</summary>
    protected void AddProjection(string name, nn.Module<Tensor, Tensor> module)
    {
        _projections[name] = module;
        register_module(name, module);
    }

    /// <summary>A projection by HF name.</summary>
    public nn.Module<Tensor, Tensor> Projection(string name) =>
        _projections.TryGetValue(name, out var m) ? m : throw new ArgumentException($"no projection '{name}'; this module has {string.Join(", ", _projections.Keys)}");

    /// <summary>Replaces a projection, keeping its name.</summary>
    public void ReplaceProjection(string name, nn.Module<Tensor, Tensor> module)
    {
        if (!_projections.ContainsKey(name)) throw new ArgumentException($"no projection '{name}'");
        _internal_submodules[name] = module;
        _projections[name] = module;
    }
}
