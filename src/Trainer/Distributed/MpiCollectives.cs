using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text;

namespace QLora.Trainer;

/// <summary>
/// Collectives over MPI's world communicator (Open MPI or the MPICH family, bound by <see cref="MpiLibrary"/>). Every
/// operation is MPI's non-blocking form, polled until done or until <see cref="Timeout"/>: a rank that died, hung or
/// was stopped makes the others fail with a <see cref="CollectiveTimeoutException"/> instead of waiting for ever. To
/// name the missing rank, each collective is paired with a tiny arrival message between rank 0 and every other rank
/// (its sequence number and a hash of what it is for), which also catches ranks that call collectives out of step.
/// MPI is initialised once per process and finalised at exit.
/// </summary>
public sealed unsafe class MpiCollectives : ICollectives
{
    const int ArrivalTag = 0x5146; // "QF"
    const int Chunk = 1 << 30; // elements per MPI call (MPI counts are int)
    static MpiCollectives? _world;
    static readonly Lock Gate = new();

    readonly MpiLibrary _mpi;
    int _sequence;
    bool _broken;
    bool _finished;

    /// <inheritdoc/>
    public int Rank { get; }
    /// <inheritdoc/>
    public int WorldSize { get; }
    /// <inheritdoc/>
    public string Description => _mpi.Version;

    /// <summary>How long a collective may wait for the slowest rank before the job is declared broken.</summary>
    public TimeSpan Timeout { get; set; } = TimeSpan.FromMinutes(10);

    /// <summary>The world of this process: MPI is loaded and initialised on first use.</summary>
    public static MpiCollectives World
    {
        get
        {
            lock (Gate) return _world ??= new MpiCollectives(MpiLibrary.Load());
        }
    }

    MpiCollectives(MpiLibrary mpi)
    {
        _mpi = mpi;
        int flag = 0;
        Check(_mpi.Initialized(&flag), "MPI_Initialized");
        if (flag == 0) Check(_mpi.Init(null, null), "MPI_Init");
        int rank = 0, size = 0;
        Check(_mpi.CommRank(_mpi.CommWorld, &rank), "MPI_Comm_rank");
        Check(_mpi.CommSize(_mpi.CommWorld, &size), "MPI_Comm_size");
        Rank = rank;
        WorldSize = size;
        AppDomain.CurrentDomain.ProcessExit += (_, _) =>
        {
            // MPI_Finalize synchronises with the other ranks: only a rank that finished in step with them may call it. A
            // rank that failed exits without it, which makes the launcher stop the whole job at once.
            if (_finished && !_broken) _mpi.Finalize();
        };
    }

    /// <summary>
    /// Marks the job's work as done on this rank (after a last collective that every rank reached), so MPI is finalised
    /// at exit; a rank that never calls this exits without finalising, and the launcher then stops the other ranks.
    /// </summary>
    public void Finish() => _finished = true;

    /// <summary>Marks this rank as failed: no further collectives, no MPI_Finalize at exit.</summary>
    public void Abandon() => _broken = true;

    /// <inheritdoc/>
    public void AllReduceSum(Span<float> buffer, string what)
    {
        fixed (float* p = buffer) AllReduce((nint)p, buffer.Length, sizeof(float), _mpi.Float, what);
    }

    /// <inheritdoc/>
    public void AllReduceSum(Span<double> buffer, string what)
    {
        fixed (double* p = buffer) AllReduce((nint)p, buffer.Length, sizeof(double), _mpi.Double, what);
    }

    void AllReduce(nint data, long count, int elementSize, nint type, string what)
    {
        using var arrival = Arrive(what);
        for (long offset = 0; offset < count; offset += Chunk)
        {
            int n = (int)Math.Min(count - offset, Chunk);
            long request = 0;
            Check(_mpi.Iallreduce(_mpi.InPlace, data + (nint)(offset * elementSize), n, type, _mpi.OpSum, _mpi.CommWorld, &request), "MPI_Iallreduce");
            Complete(&request, arrival, what);
        }
        Complete(null, arrival, what);
    }

    /// <inheritdoc/>
    public void Broadcast(Span<byte> buffer, int root, string what)
    {
        if (root < 0 || root >= WorldSize) throw new ArgumentOutOfRangeException(nameof(root), root, $"ranks are 0 to {WorldSize - 1}");
        using var arrival = Arrive(what);
        fixed (byte* p = buffer)
        {
            for (int offset = 0; offset < buffer.Length; offset += Chunk)
            {
                int n = Math.Min(buffer.Length - offset, Chunk);
                long request = 0;
                Check(_mpi.Ibcast((nint)(p + offset), n, _mpi.Byte, root, _mpi.CommWorld, &request), "MPI_Ibcast");
                Complete(&request, arrival, what);
            }
        }
        Complete(null, arrival, what);
    }

    /// <inheritdoc/>
    public void Barrier(string what)
    {
        using var arrival = Arrive(what);
        long request = 0;
        Check(_mpi.Ibarrier(_mpi.CommWorld, &request), "MPI_Ibarrier");
        Complete(&request, arrival, what);
        Complete(null, arrival, what);
    }

    /// <inheritdoc/>
    public byte[] AllGather(ReadOnlySpan<byte> local, string what)
    {
        var all = new byte[(long)local.Length * WorldSize];
        using var arrival = Arrive(what);
        fixed (byte* s = local)
        fixed (byte* r = all)
        {
            long request = 0;
            Check(_mpi.Iallgather((nint)s, local.Length, _mpi.Byte, (nint)r, local.Length, _mpi.Byte, _mpi.CommWorld, &request), "MPI_Iallgather");
            Complete(&request, arrival, what);
        }
        Complete(null, arrival, what);
        return all;
    }

    /// <summary>
    /// Posts this rank's arrival at collective number <see cref="_sequence"/>: rank 0 tells every rank and hears from
    /// every rank; the others tell and hear from rank 0. Messages between two ranks arrive in order, so the k-th
    /// message is about the k-th collective.
    /// </summary>
    Arrival Arrive(string what)
    {
        if (_broken) throw new InvalidOperationException("an earlier collective failed; the ranks are no longer in step");
        int sequence = ++_sequence;
        var peers = Rank == 0 ? Enumerable.Range(1, WorldSize - 1).ToArray() : [0];
        var arrival = new Arrival(peers, sequence, Hash(what));
        for (int i = 0; i < peers.Length; i++)
        {
            Check(_mpi.Irecv((nint)arrival.Received(i), 2, _mpi.Int, peers[i], ArrivalTag, _mpi.CommWorld, arrival.ReceiveRequest(i)), "MPI_Irecv");
            Check(_mpi.Isend((nint)arrival.Sent, 2, _mpi.Int, peers[i], ArrivalTag, _mpi.CommWorld, arrival.SendRequest(i)), "MPI_Isend");
        }
        return arrival;
    }

    /// <summary>Polls <paramref name="request"/> (when given) and the arrival messages until the request is done (and, without one, until every arrival is).</summary>
    void Complete(long* request, Arrival arrival, string what)
    {
        long deadline = Stopwatch.GetTimestamp() + (long)(Timeout.TotalSeconds * Stopwatch.Frequency);
        var status = stackalloc byte[64]; // MPI_Status: 20-24 bytes in the supported implementations
        bool done = request is null;
        for (int spin = 0; ; spin++)
        {
            if (!done)
            {
                int flag = 0;
                Check(_mpi.Test(request, &flag, status), "MPI_Test");
                done = flag != 0;
            }
            bool arrived = Poll(arrival, status, what);
            if (done && (request is not null || arrived)) return;
            if (Stopwatch.GetTimestamp() > deadline) throw TimedOut(arrival, what);
            if (spin < 2000) Thread.Yield();
            else Thread.Sleep(1);
        }
    }

    bool Poll(Arrival arrival, byte* status, string what)
    {
        bool all = true;
        for (int i = 0; i < arrival.Peers.Length; i++)
        {
            for (int k = 0; k < 2; k++)
            {
                if (arrival.Done[2 * i + k]) continue;
                int flag = 0;
                Check(_mpi.Test(k == 0 ? arrival.ReceiveRequest(i) : arrival.SendRequest(i), &flag, status), "MPI_Test");
                if (flag == 0) { all = false; continue; }
                arrival.Done[2 * i + k] = true;
                if (k == 0)
                {
                    var got = arrival.Received(i);
                    if (got[0] != arrival.Sent[0] || got[1] != arrival.Sent[1])
                    {
                        _broken = true;
                        throw new InvalidOperationException($"rank {Rank}: rank {arrival.Peers[i]} called a different collective (its #{got[0]}) than this rank's {what} " +
                            $"(#{arrival.Sent[0]}): the ranks are out of step (do they run the same job file and version?)");
                    }
                }
            }
        }
        return all;
    }

    CollectiveTimeoutException TimedOut(Arrival arrival, string what)
    {
        _broken = true;
        var missing = arrival.Peers.Where((_, i) => !arrival.Done[2 * i]).ToList();
        string seconds = $"{Timeout.TotalSeconds:0.#} s";
        string message = Rank == 0 || missing.Count > 0
            ? $"rank {Rank}: rank{(missing.Count > 1 ? "s" : "")} {string.Join(", ", missing)} did not reach {what} within {seconds} (died, hung or was stopped); stopping"
            : $"rank {Rank}: {what} did not complete within {seconds}; rank 0 arrived, so another rank is missing (rank 0's error names it); stopping";
        return new CollectiveTimeoutException(message);
    }

    void Check(int code, string call)
    {
        if (code == 0) return;
        _broken = true;
        throw new IOException($"rank {Rank}: {call} failed with MPI error code {code}");
    }

    // FNV-1a: the same on every rank (string.GetHashCode is randomised per process).
    static int Hash(string s)
    {
        uint h = 2166136261;
        foreach (var b in Encoding.UTF8.GetBytes(s)) h = (h ^ b) * 16777619;
        return (int)h;
    }

    /// <summary>The native buffers of one collective's arrival messages (freed when done; kept if MPI may still write them).</summary>
    sealed class Arrival : IDisposable
    {
        readonly int* _memory;
        readonly long* _requests;

        public Arrival(int[] peers, int sequence, int hash)
        {
            Peers = peers;
            Done = new bool[2 * peers.Length];
            _memory = (int*)NativeMemory.AllocZeroed((nuint)(2 + 2 * peers.Length), sizeof(int));
            _requests = (long*)NativeMemory.AllocZeroed((nuint)(2 * peers.Length), sizeof(long));
            _memory[0] = sequence;
            _memory[1] = hash;
        }

        public int[] Peers { get; }
        public bool[] Done { get; }
        public int* Sent => _memory;
        public int* Received(int i) => _memory + 2 + 2 * i;
        public long* ReceiveRequest(int i) => _requests + 2 * i;
        public long* SendRequest(int i) => _requests + 2 * i + 1;

        public void Dispose()
        {
            if (Done.Any(d => !d)) return; // MPI still owns the buffers of an unfinished message
            NativeMemory.Free(_memory);
            NativeMemory.Free(_requests);
        }
    }
}
