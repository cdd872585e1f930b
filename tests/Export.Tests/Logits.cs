using QLora.Trainer;
using static TorchSharp.torch;

namespace QLora.Export.Tests;

/// <summary>qlora's logits as plain arrays, and the comparisons the llama.cpp tests make.</summary>
internal static class Logits
{
    /// <summary><paramref name="model"/>'s float32 logits of every position of <paramref name="ids"/>: [positions][vocab].</summary>
    public static float[][] Of(LlamaForCausalLM model, int[] ids)
    {
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        var logits = model.Logits(tensor(ids.Select(i => (long)i).ToArray()).unsqueeze(0)).squeeze(0).to(ScalarType.Float32);
        var flat = logits.data<float>().ToArray();
        int v = (int)logits.shape[1];
        return Enumerable.Range(0, ids.Length).Select(p => flat.AsSpan(p * v, v).ToArray()).ToArray();
    }

    /// <summary>The largest absolute difference between two [positions][vocab] arrays.</summary>
    public static double MaxDifference(float[][] a, float[][] b)
    {
        double worst = 0;
        for (int p = 0; p < a.Length; p++)
            for (int j = 0; j < a[p].Length; j++) worst = Math.Max(worst, Math.Abs(a[p][j] - b[p][j]));
        return worst;
    }

    /// <summary>The largest absolute logit.</summary>
    public static double MaxMagnitude(float[][] a) => a.Max(row => row.Max(x => Math.Abs((double)x)));
}
