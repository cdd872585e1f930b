namespace QLora.Trainer;

/// <summary>
/// Whether this process was started by an MPI launcher (mpirun, mpiexec, srun --mpi=pmi2/pmix), read from the
/// variables the launchers set, so that nothing MPI is loaded by a job that was not.
/// </summary>
public static class MpiLaunch
{
    // Open MPI's mpirun; MPICH's Hydra and Slurm's PMI-1/PMI-2; PMIx (Open MPI 5, Slurm --mpi=pmix).
    static readonly string[] SizeVariables = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"];
    static readonly string[] RankVariables = ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"];
    static readonly string[] LocalSizeVariables = ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMIX_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"];
    static readonly string[] LocalRankVariables = ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMIX_LOCAL_RANK", "SLURM_LOCALID"];

    /// <summary>True when an MPI launcher started this process (any of its rank or size variables is set).</summary>
    public static bool IsLaunched => SizeVariables.Concat(RankVariables).Any(v => !string.IsNullOrEmpty(Environment.GetEnvironmentVariable(v)));

    /// <summary>The world size the launcher announced (null when it did not say; MPI itself is then asked).</summary>
    public static int? AnnouncedWorldSize => First(SizeVariables);

    /// <summary>Ranks of this job on this machine, when the launcher says (for dividing the cores among them).</summary>
    public static int? LocalSize => First(LocalSizeVariables);

    /// <summary>
    /// This process's rank among the job's ranks on this machine (0 first), when launched by MPI and the launcher says;
    /// each rank takes the CUDA device of its local rank, as torchrun's LOCAL_RANK does.
    /// </summary>
    public static int? LocalRank => IsLaunched ? First(LocalRankVariables, minimum: 0) : null;

    static int? First(string[] names, int minimum = 1)
    {
        foreach (var n in names)
            if (int.TryParse(Environment.GetEnvironmentVariable(n), out var v) && v >= minimum) return v;
        return null;
    }
}
