namespace QLora.Trainer;

/// <summary>One rank: a sum over one rank is the buffer itself, so every call leaves its data as it is.</summary>
public sealed class SingleProcessCollectives : ICollectives
{
    /// <summary>The one instance.</summary>
    public static readonly SingleProcessCollectives Instance = new();

    SingleProcessCollectives() { }

    /// <inheritdoc/>
    public int Rank => 0;
    /// <inheritdoc/>
    public int WorldSize => 1;
    /// <inheritdoc/>
    public string Description => "single process";
    /// <inheritdoc/>
    public void AllReduceSum(Span<float> buffer, string what) { }
    /// <inheritdoc/>
    public void AllReduceSum(Span<double> buffer, string what) { }
    /// <inheritdoc/>
    public void Broadcast(Span<byte> buffer, int root, string what)
    {
        if (root != 0) throw new ArgumentOutOfRangeException(nameof(root), root, "a single process has only rank 0");
    }
    /// <inheritdoc/>
    public void Barrier(string what) { }
    /// <inheritdoc/>
    public byte[] AllGather(ReadOnlySpan<byte> local, string what) => local.ToArray();
}
