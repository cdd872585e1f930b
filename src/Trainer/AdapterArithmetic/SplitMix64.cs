using System.Text;

namespace QLora.Trainer;

/// <summary>
/// The random numbers of DARE's pruning: Steele, Lea and Flood's SplitMix64 (the generator Java's SplittableRandom and
/// Vigna's xoshiro seeding use), one stream per tensor, so a seed gives the same masks on every machine and .NET
/// version, and the mask of one tensor does not depend on which other tensors are merged. (It cannot reproduce
/// PyTorch's <c>torch.bernoulli</c> stream, which depends on the device and libtorch's generator.)
/// </summary>
public sealed class SplitMix64
{
    private ulong _state;

    /// <summary>A stream starting from <paramref name="seed"/>.</summary>
    public SplitMix64(ulong seed) => _state = seed;

    /// <summary>
    /// The stream of tensor <paramref name="key"/> under <paramref name="seed"/>: seeded with
    /// <c>seed XOR FNV-1a-64(UTF-8 key)</c>.
    /// </summary>
    public static SplitMix64 ForKey(ulong seed, string key)
    {
        ulong h = 14695981039346656037UL; // FNV-1a 64-bit offset basis
        foreach (var b in Encoding.UTF8.GetBytes(key)) h = (h ^ b) * 1099511628211UL;
        return new SplitMix64(seed ^ h);
    }

    /// <summary>The next 64 random bits.</summary>
    public ulong Next()
    {
        ulong z = _state += 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }

    /// <summary>A uniform double in [0, 1): the top 53 bits of <see cref="Next"/> times 2⁻⁵³.</summary>
    public double NextDouble() => (Next() >> 11) * (1.0 / (1UL << 53));
}
