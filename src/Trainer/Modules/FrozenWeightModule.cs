using TorchSharp.Modules;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// A module whose one parameter is a frozen <c>weight</c> (norms, embeddings), exposed as a property that
/// <c>Module.to</c> can set: TorchSharp hands a moved parameter to a public property of the same name instead of
/// re-registering it, so a getter-only property would make moving the module to a GPU (or another dtype) throw.
/// </summary>
public abstract class FrozenWeightModule : nn.Module<Tensor, Tensor>
{
    /// <summary>Registers <paramref name="weight"/> (detached, no gradient) as the module's <c>weight</c>.</summary>
    protected FrozenWeightModule(string name, Tensor weight) : base(name)
    {
        register_parameter("weight", new Parameter(weight.detach(), requires_grad: false));
    }

    /// <summary>The weight (looked up by name: Module.to() replaces registered tensors, through this setter).</summary>
    public Parameter weight
    {
        get => get_parameter("weight")!;
        protected set
        {
            var old = get_parameter("weight");
            ConditionallyRegisterParameter("weight", value);
            if (old is not null && !ReferenceEquals(old, value)) old.Dispose();
        }
    }
}
