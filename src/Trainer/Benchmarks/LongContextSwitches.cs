namespace QLora.Trainer;

/// <summary>
/// The long-context switches a memory benchmark can turn on, as a job sets them (<c>Training:MlpTileTokens</c>,
/// <c>Training:NormTileTokens</c>, <c>Training:AttentionByGroup</c>): so a measured step can be compared with the plan
/// of the same settings.
/// </summary>
public sealed record LongContextSwitches(int MlpTileTokens = 0, int NormTileTokens = 0, bool AttentionByGroup = false)
{
    /// <summary>Sets them on <paramref name="model"/>.</summary>
    public void Apply(LlamaForCausalLM model)
    {
        model.MlpTileTokens = MlpTileTokens;
        model.NormTileTokens = NormTileTokens;
        model.AttentionByGroup = AttentionByGroup;
    }
}
