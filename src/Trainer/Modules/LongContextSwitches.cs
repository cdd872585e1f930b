namespace QLora.Trainer;

/// <summary>
/// The long-context switches of a model, as a job sets them (<c>Training:MlpTileTokens</c>, <c>Training:NormTileTokens</c>,
/// <c>Training:AttentionByGroup</c>): one set for training, evaluation and the memory benchmarks, so a measured step runs
/// with the settings its plan was made for.
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
