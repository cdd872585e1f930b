using System.Runtime.InteropServices;
using QLora.Kernels;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

/// <summary>
/// The NCCL binding and the data-parallel gradient sum through it, on the CPU: NCCL's C API is stood in for by managed
/// functions exported as unmanaged entry points (<see cref="StandIn"/>), bound exactly as the real library is (by
/// symbol name, through unmanaged function pointers, the 128-byte unique id passed by value). The stand-in "sums" over a
/// world in which every rank holds the same buffer, so the sum is N times it, on host memory. Whether the real library
/// and a GPU agree is checked by <c>qlora bench nccl</c> in the GPU check script.
/// </summary>
public unsafe class NcclTests
{
    [Fact]
    public void TheLibraryIsLookedForWhereAPipInstalledPyTorchKeepsItThenOnTheLoaderPathAndTheUsersOwnPathAlone()
    {
        if (!OperatingSystem.IsLinux()) return;
        var torchLib = Path.Combine("/opt", "venv", "lib", "python3.12", "site-packages", "torch", "lib");
        Assert.Equal(["/opt/venv/lib/python3.12/site-packages/nvidia/nccl/lib/libnccl.so.2", "libnccl.so.2", "libnccl.so"],
            NcclLibrary.Candidates(null, [torchLib]));
        Assert.Equal(["/my/libnccl.so.2"], NcclLibrary.Candidates("/my/libnccl.so.2", [torchLib]));
    }

    [Fact]
    public void NoLibraryAtTheUsersPathIsOneLineSayingWhatToDo()
    {
        // This machine has no NCCL at all: with nothing named the reason lists what was tried.
        var lib = NcclLibrary.TryLoad([Path.Combine(Path.GetTempPath(), "no-torch", "lib")], out var reason);
        if (lib is not null) return; // a machine with NCCL installed: nothing to check here
        Assert.Contains("libnccl.so.2", reason);
        Assert.DoesNotContain('\n', reason!);
    }

    [Fact]
    public void OffLoadsNoLibraryAndSaysSo()
    {
        lock (StandIn.Gate) // this class's tests run one at a time; no other test reads QLORA_NCCL
        {
            var before = Environment.GetEnvironmentVariable(NcclLibrary.PathVariable);
            try
            {
                Environment.SetEnvironmentVariable(NcclLibrary.PathVariable, "OFF");
                Assert.Null(NcclLibrary.TryLoad([], out var reason));
                Assert.Equal("QLORA_NCCL=off", reason);
            }
            finally { Environment.SetEnvironmentVariable(NcclLibrary.PathVariable, before); }
        }
    }

    [Theory]
    [InlineData(22705, "2.27.5")]
    [InlineData(21803, "2.18.3")]
    [InlineData(2708, "2.7.8")] // before 2.9 the code was X·1000 + Y·100 + Z
    public void TheVersionCodeReadsAsNcclWritesIt(int code, string version) => Assert.Equal(version, NcclLibrary.FormatVersion(code));

    [Fact]
    public void TheUniqueIdTravelsByValueIntact()
    {
        lock (StandIn.Gate)
        {
            var nccl = StandIn.Bind(version: 22705);
            Assert.Equal("2.27.5", nccl.Version);
            var id = nccl.NewUniqueId();
            Assert.Equal(NcclLibrary.UniqueIdBytes, id.Length);
            Assert.Equal(Enumerable.Range(0, 128).Select(i => (byte)(i * 7 + 3)), id); // what the stand-in wrote
            id[0] ^= 0xFF; // a different id: what init receives must be this one, every byte
            nint comm = nccl.InitRank(4, id, 2);
            Assert.Equal(StandIn.Comm, comm);
            Assert.Equal(id, StandIn.InitId);
            Assert.Equal((4, 2), (StandIn.InitRanks, StandIn.InitRank));
        }
    }

    [Fact]
    public void AFailedCallNamesTheCallAndNcclsWords()
    {
        lock (StandIn.Gate)
        {
            var nccl = StandIn.Bind();
            StandIn.InitResult = 2;
            var e = Assert.Throws<NcclException>(() => nccl.InitRank(2, new byte[128], 0));
            Assert.Equal(2, e.Result);
            Assert.Contains("ncclCommInitRank", e.Message);
            Assert.Contains("stand-in error 2", e.Message);
        }
    }

    [Fact]
    public void CudaRanksSumTheirGradientsThroughNcclInOneBufferAndNotThroughMpi()
    {
        lock (StandIn.Gate)
        {
            var nccl = StandIn.Bind();
            var world = new World(3);
            int released = 0, current = 0;
            var dp = DataParallel.Over(world, d => NcclCommunicator.Join(d, nccl, null, () => current++, () => () => true, () => released++, null));
            Assert.NotNull(dp.Nccl);
            Assert.Equal(StandIn.IdBytes(), StandIn.InitId); // rank 0's id went to init
            Assert.Equal((3, 0), (StandIn.InitRanks, StandIn.InitRank));

            using var a = new TorchSharp.Modules.Parameter(zeros(2, 3));
            using var b = new TorchSharp.Modules.Parameter(zeros(4));
            a.grad = arange(6, dtype: ScalarType.Float32).reshape(2, 3);
            var (loss, stop) = dp.ReduceGradients([a, b], 0.5, stopRequested: false, step: 3);
            Assert.Equal((1.5, false), (loss, stop));
            Assert.Equal(0, world.FloatCalls); // the gradients did not go through MPI
            Assert.Equal(1, StandIn.AllReduceCalls);
            Assert.Equal((10L, NcclLibrary.Float32, NcclLibrary.Sum, StandIn.Comm, (nint)0), (StandIn.Count, StandIn.DataType, StandIn.Op, StandIn.AllReduceComm, StandIn.Stream));
            Assert.True(StandIn.InPlace);
            Assert.Equal([0f, 3, 6, 9, 12, 15], a.grad!.data<float>().ToArray());
            Assert.Equal([0f, 0, 0, 0], b.grad!.data<float>().ToArray());
            Assert.True(current >= 2); // the device was made current to join and to sum

            dp.Dispose();
            Assert.Equal((1, 0, 1), (StandIn.DestroyCalls, StandIn.AbortCalls, released));
        }
    }

    [Fact]
    public void WhenAnyRankCannotLoadNcclEveryRankSumsThroughHostMemory()
    {
        lock (StandIn.Gate)
        {
            var nccl = StandIn.Bind();
            var world = new World(3) { RanksWithNccl = 2 }; // this rank loaded it, one other did not
            var lines = new List<string>();
            var dp = DataParallel.Over(world, d => NcclCommunicator.Join(d, nccl, null, () => { }, () => () => true, null, lines.Add));
            Assert.Null(dp.Nccl);
            Assert.Equal(["1 of 3 ranks cannot load NCCL; the LoRA gradients are summed through host memory over MPI"], lines);
            Assert.Equal(0, StandIn.InitCalls); // no rank joined a communicator

            using var a = new TorchSharp.Modules.Parameter(zeros(2));
            a.grad = tensor(new float[] { 1, -2 });
            dp.ReduceGradients([a], 1, false, 1);
            Assert.Equal(1, world.FloatCalls);
            Assert.Equal([3f, -6], a.grad!.data<float>().ToArray());

            // The rank without it says why.
            lines.Clear();
            var world2 = new World(2) { RanksWithNccl = 1 };
            Assert.Null(NcclCommunicator.Join(DataParallel.Over(world2), null, "no NCCL library found", () => { }, () => () => true, null, lines.Add));
            Assert.Equal(["rank 0: no NCCL (no NCCL library found); the LoRA gradients are summed through host memory over MPI"], lines);
        }
    }

    [Fact]
    public void AnAsynchronousNcclErrorAbortsTheCommunicatorAndSaysWhatFailed()
    {
        lock (StandIn.Gate)
        {
            var nccl = StandIn.Bind();
            using var comm = NcclCommunicator.Join(DataParallel.Over(new World(2)), nccl, null, () => { }, () => () => false, null, null)!;
            StandIn.AsyncState = 6; // ncclRemoteError: a peer failed
            using var buffer = ones(8);
            var e = Assert.Throws<NcclException>(() => comm.AllReduceSum(buffer, "the gradients of step 9"));
            Assert.Contains("the gradients of step 9", e.Message);
            Assert.Contains("rank 0", e.Message);
            Assert.Contains("stand-in error 6", e.Message);
            Assert.Equal(1, StandIn.AbortCalls);
            Assert.Throws<ObjectDisposedException>(() => comm.AllReduceSum(buffer, "after the abort"));
        }
    }

    [Fact]
    public void AnAllReduceThatNeverCompletesTimesOutInsteadOfHanging()
    {
        lock (StandIn.Gate)
        {
            var nccl = StandIn.Bind();
            using var comm = NcclCommunicator.Join(DataParallel.Over(new World(2)), nccl, null, () => { }, () => () => false, null, null)!;
            comm.Timeout = TimeSpan.FromMilliseconds(200);
            StandIn.AsyncState = NcclLibrary.InProgress; // still running: not an error
            using var buffer = ones(8);
            var clock = System.Diagnostics.Stopwatch.StartNew();
            var e = Assert.Throws<CollectiveTimeoutException>(() => comm.AllReduceSum(buffer, "the gradients of step 4"));
            Assert.InRange(clock.Elapsed.TotalSeconds, 0.2, 30);
            Assert.Contains("the gradients of step 4 did not complete within 0.2 s", e.Message);
            Assert.Equal(1, StandIn.AbortCalls);
            comm.Dispose();
            Assert.Equal(0, StandIn.DestroyCalls); // an aborted communicator is not destroyed again
        }
    }

    /// <summary>A world of N ranks seen from rank 0; every rank holds the same data unless <see cref="RanksWithNccl"/> says otherwise.</summary>
    sealed class World(int size) : ICollectives
    {
        public int? RanksWithNccl { get; init; }
        public int FloatCalls { get; private set; }
        public int Rank => 0;
        public int WorldSize => size;
        public string Description => "stand-in world";
        public void AllReduceSum(Span<float> buffer, string what)
        {
            FloatCalls++;
            foreach (ref var x in buffer) x *= size;
        }
        public void AllReduceSum(Span<double> buffer, string what)
        {
            if (RanksWithNccl is int n && what.Contains("NCCL")) { buffer[0] = buffer[0] > 0 ? n : n - 1; return; }
            foreach (ref var x in buffer) x *= size;
        }
        public void Broadcast(Span<byte> buffer, int root, string what) => Assert.Equal(0, root); // rank 0 already holds it
        public void Barrier(string what) { }
        public byte[] AllGather(ReadOnlySpan<byte> local, string what) => throw new NotSupportedException();
    }

    /// <summary>NCCL's C API as managed functions with unmanaged entry points, recording what they were given.</summary>
    static class StandIn
    {
        public static readonly object Gate = new();
        public const nint Comm = 0x5eed;
        static int _version;
        public static int WorldSize = 3;
        public static int InitResult, InitCalls, InitRanks, InitRank, AllReduceCalls, DataType, Op, AbortCalls, DestroyCalls, AsyncState;
        public static byte[] InitId = [];
        public static long Count;
        public static nint AllReduceComm, Stream;
        public static bool InPlace;
        static readonly nint[] ErrorTexts = [.. Enumerable.Range(0, 10).Select(i => Marshal.StringToCoTaskMemUTF8($"stand-in error {i}"))];

        public static byte[] IdBytes() => [.. Enumerable.Range(0, 128).Select(i => (byte)(i * 7 + 3))];

        public static NcclLibrary Bind(int version = 22307)
        {
            (_version, InitResult, InitCalls, InitRanks, InitRank, AllReduceCalls, DataType, Op, AbortCalls, DestroyCalls, AsyncState) = (version, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
            (InitId, Count, AllReduceComm, Stream, InPlace, WorldSize) = ([], 0, 0, -1, false, 3);
            return new NcclLibrary(name => name switch
            {
                "ncclGetVersion" => (nint)(delegate* unmanaged<int*, int>)&GetVersion,
                "ncclGetUniqueId" => (nint)(delegate* unmanaged<Id*, int>)&GetUniqueId,
                "ncclCommInitRank" => (nint)(delegate* unmanaged<nint*, int, Id, int, int>)&CommInitRank,
                "ncclAllReduce" => (nint)(delegate* unmanaged<nint, nint, nuint, int, int, nint, nint, int>)&AllReduce,
                "ncclCommGetAsyncError" => (nint)(delegate* unmanaged<nint, int*, int>)&CommGetAsyncError,
                "ncclCommAbort" => (nint)(delegate* unmanaged<nint, int>)&CommAbort,
                "ncclCommDestroy" => (nint)(delegate* unmanaged<nint, int>)&CommDestroy,
                "ncclGetErrorString" => (nint)(delegate* unmanaged<int, byte*>)&GetErrorString,
                _ => 0,
            }, "stand-in");
        }

        [StructLayout(LayoutKind.Sequential)]
        public struct Id { public fixed byte Bytes[128]; }

        [UnmanagedCallersOnly]
        static int GetVersion(int* v) { *v = _version; return 0; }

        [UnmanagedCallersOnly]
        static int GetUniqueId(Id* id)
        {
            IdBytes().CopyTo(new Span<byte>(id->Bytes, 128));
            return 0;
        }

        [UnmanagedCallersOnly]
        static int CommInitRank(nint* comm, int ranks, Id id, int rank)
        {
            InitCalls++;
            if (InitResult != 0) return InitResult;
            InitId = new ReadOnlySpan<byte>(id.Bytes, 128).ToArray();
            (InitRanks, InitRank, *comm) = (ranks, rank, Comm);
            return 0;
        }

        [UnmanagedCallersOnly]
        static int AllReduce(nint send, nint receive, nuint count, int dataType, int op, nint comm, nint stream)
        {
            AllReduceCalls++;
            (Count, DataType, Op, AllReduceComm, Stream, InPlace) = ((long)count, dataType, op, comm, stream, send == receive);
            var s = new ReadOnlySpan<float>((void*)send, checked((int)count));
            var r = new Span<float>((void*)receive, checked((int)count));
            for (int i = 0; i < r.Length; i++) r[i] = s[i] * WorldSize;
            return 0;
        }

        [UnmanagedCallersOnly]
        static int CommGetAsyncError(nint comm, int* state) { *state = AsyncState; return 0; }

        [UnmanagedCallersOnly]
        static int CommAbort(nint comm) { AbortCalls++; return 0; }

        [UnmanagedCallersOnly]
        static int CommDestroy(nint comm) { DestroyCalls++; return 0; }

        [UnmanagedCallersOnly]
        static byte* GetErrorString(int result) => (byte*)ErrorTexts[Math.Clamp(result, 0, ErrorTexts.Length - 1)];
    }
}
