namespace QLora.Trainer;

/// <summary>
/// The collective operations data-parallel training needs, over one group of ranks (processes) that each run the same
/// job: every rank calls the same operations in the same order. Implementations: <see cref="SingleProcessCollectives"/>
/// (one rank, every call a no-op) and <see cref="MpiCollectives"/> (MPI through its C API). Each call names what it
/// is for (<c>what</c>), so a rank that never arrives can be reported with the step it failed to reach.
/// </summary>
public interface ICollectives
{
    /// <summary>This process's rank, 0 to <see cref="WorldSize"/> − 1; rank 0 writes the job's files.</summary>
    int Rank { get; }

    /// <summary>The number of ranks.</summary>
    int WorldSize { get; }

    /// <summary>The engine in words (e.g. "single process", "Open MPI v4.1.4").</summary>
    string Description { get; }

    /// <summary>Replaces every element of <paramref name="buffer"/> by its sum over all ranks (the same on every rank).</summary>
    void AllReduceSum(Span<float> buffer, string what);

    /// <summary>As the float overload, in float64 (counts and loss sums).</summary>
    void AllReduceSum(Span<double> buffer, string what);

    /// <summary>Copies <paramref name="buffer"/> of rank <paramref name="root"/> into the same-sized buffer of every rank.</summary>
    void Broadcast(Span<byte> buffer, int root, string what);

    /// <summary>Returns when every rank has called it.</summary>
    void Barrier(string what);

    /// <summary>Every rank's <paramref name="local"/> (all the same length), concatenated in rank order, on every rank.</summary>
    byte[] AllGather(ReadOnlySpan<byte> local, string what);
}
