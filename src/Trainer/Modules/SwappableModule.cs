using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>A module whose registered submodules can be swapped in place (to wrap a projection with LoRA, keeping HF names).</summary>
public abstract class SwappableModule : nn.Module
{
    /// <summary>Names the module.</summary>
    protected SwappableModule(string name) : base(name) { }

    /// <summary>Replaces the submodule registered as <paramref name="name"/>.</summary>
    protected void Swap(string name, nn.Module module)
    {
        if (!_internal_submodules.ContainsKey(name)) throw new ArgumentException($"no submodule '{name}'");
        _internal_submodules[name] = module;
    }
}
