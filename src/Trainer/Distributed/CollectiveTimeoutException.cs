namespace QLora.Trainer;

/// <summary>
/// A collective did not complete within its timeout: a rank died, hung or was stopped. The message names the rank
/// when this rank can tell which one; the process should exit (the collective cannot be cancelled in MPI).
/// </summary>
public sealed class CollectiveTimeoutException(string message) : IOException(message);
