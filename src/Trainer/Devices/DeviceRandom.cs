using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Seeding the random generator a device's dropout draws from. TorchSharp cannot save and restore the CUDA generator's
/// state, so a checkpointed layer on CUDA gets the same dropout masks in its forward and its backward recompute by
/// reseeding the generator with the same value before both (see <see cref="LlamaForCausalLM.ReseedDropout"/>).
/// </summary>
public static class DeviceRandom
{
    /// <summary>Seeds the default generator of <paramref name="device"/>'s type (the CPU's, or every CUDA device's).</summary>
    public static void ManualSeed(Device device, long seed)
    {
        if (device.type == DeviceType.CUDA) cuda.manual_seed_all(seed);
        else random.manual_seed(seed).Dispose(); // the wrapper only; the default generator lives on
    }

    /// <summary>A fresh non-negative seed drawn from the CPU's default generator (seeded by the job and saved in its checkpoints).</summary>
    public static long DrawFromCpu()
    {
        using var t = randint(0, long.MaxValue, [1], dtype: ScalarType.Int64);
        return t.item<long>();
    }

    /// <summary>The seed of one part (e.g. layer <paramref name="index"/>) of a draw: SplitMix64 of the two, non-negative.</summary>
    public static long Derive(long seed, int index)
    {
        ulong z = unchecked((ulong)seed + 0x9E3779B97F4A7C15UL * (ulong)(index + 1));
        z = unchecked((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL);
        z = unchecked((z ^ (z >> 27)) * 0x94D049BB133111EBUL);
        return (long)((z ^ (z >> 31)) & long.MaxValue);
    }
}
