using TorchSharp.Modules;

namespace QLora.Trainer;

/// <summary>
/// Named parameters updated with one learning rate (LoRA+ puts the B matrices in a group of their own with a larger
/// rate). Names key the state in checkpoints.
/// </summary>
public sealed record ParameterGroup(IReadOnlyList<(string Name, Parameter Parameter)> Parameters, double? LearningRate = null)
{
    /// <summary>The group's name in logs (the first parameter's, when not given).</summary>
    public string? Name { get; init; }
}
