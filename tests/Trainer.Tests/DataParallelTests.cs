using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

public class BatchShardingTests
{
    [Theory]
    [InlineData(8, 1)]
    [InlineData(8, 2)]
    [InlineData(8, 3)]
    [InlineData(7, 4)]
    [InlineData(2, 2)]
    [InlineData(3, 8)]
    public void TheRanksShardsAreDisjointContiguousBalancedAndTogetherTheGlobalStep(int count, int ranks)
    {
        var global = Enumerable.Range(100, count).ToList();
        var shards = Enumerable.Range(0, ranks).Select(r => BatchSharding.Shard(global, r, ranks)).ToList();
        Assert.Equal(global, shards.SelectMany(s => s)); // rank order concatenates to the global order: nothing lost or repeated
        Assert.True(shards.Max(s => s.Count) - shards.Min(s => s.Count) <= 1);
        // Hand-checked: 7 micro-batches over 4 ranks are 2, 2, 2, 1 starting at 0, 2, 4, 6.
        if (count == 7) Assert.Equal([(0, 2), (2, 2), (4, 2), (6, 1)], Enumerable.Range(0, 4).Select(r => BatchSharding.Range(7, r, 4)));
    }

    [Fact]
    public void ABadRankIsRefused()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => BatchSharding.Range(4, 2, 2));
        Assert.Throws<ArgumentOutOfRangeException>(() => BatchSharding.Range(4, 0, 0));
    }
}

public class DataParallelTests
{
    [Fact]
    public void OutsideMpiTheJobRunsAsOneProcessAndEveryCollectiveLeavesTheDataAsItIs()
    {
        // The test host is not started by an MPI launcher: auto gives one process and loads no MPI library.
        using var dp = DataParallel.Start("auto", TimeSpan.FromSeconds(1));
        Assert.False(dp.Enabled);
        Assert.Equal((0, 1), (dp.Rank, dp.WorldSize));
        Assert.Equal(0, dp.DefaultThreads);
        Assert.Equal(42, dp.RankSeed(42));
        Assert.Null(dp.Check(1));
        var batches = new List<int> { 1, 2, 3 };
        Assert.Same(batches, dp.Shard(batches));

        using var p = new TorchSharp.Modules.Parameter(tensor(new float[] { 1, 2 }));
        p.grad = tensor(new float[] { 0.5f, -0.25f });
        var (loss, stop) = dp.ReduceGradients([p], 3.5, stopRequested: true, step: 1);
        Assert.Equal((3.5, true), (loss, stop));
        Assert.Equal([0.5f, -0.25f], p.grad!.data<float>().ToArray());
        Assert.Equal("x", dp.OnRoot(() => "x", "a test"));
        Assert.Equal(["s"], dp.AllGather("s", "a test"));
        dp.Finish();
    }

    [Fact]
    public void FewerMicroBatchesPerStepThanRanksIsRefusedWithWhatToSet()
    {
        var problem = DataParallel.Over(new FakeWorld(4)).Check(2);
        Assert.Contains("Training:GradientAccumulationSteps = 2 with 4 ranks", problem);
        Assert.Contains("multiple of 4", problem);
        Assert.Null(DataParallel.Over(new FakeWorld(4)).Check(6));
    }

    [Fact]
    public void TheThroughputModelCountsTheRingTrafficOfTheLoraGradients()
    {
        var config = TinyLlama.Config(layers: 2, hidden: 32, vocab: 50);
        var options = new PlanOptions { SequenceLength = 16, MicroBatch = 2, LoraRank = 4 };
        var plan = MemoryPlanner.Plan(config, options);
        var m = DataParallelPlan.Of(config, options, plan, microBatchesPerStep: 5, ranks: 2);
        Assert.Equal(3, m.MicroBatchesPerRank); // the busiest rank
        Assert.Equal(3 * 2 * 16, m.TokensPerRank);
        Assert.Equal(4 * plan.TrainableParameters, m.AllReduceBytes);
        Assert.Equal(m.AllReduceBytes, m.RingBytesPerRank); // 2(N-1)/N = 1 for two ranks
        Assert.Equal(0, DataParallelPlan.Of(config, options, plan, 5, 1).RingBytesPerRank);
    }

    [Fact]
    public void TheGradientsAreSummedInOneFlatBufferAndAParameterWithoutAGradientGetsTheSum()
    {
        // Every rank of the fake world holds the same buffer, so the sum is N times it: each gradient must come back
        // multiplied by N in place, in its own shape, and a parameter without a gradient gets one of zeros.
        var world = new FakeWorld(3);
        var dp = DataParallel.Over(world);
        using var a = new TorchSharp.Modules.Parameter(zeros(2, 3));
        using var b = new TorchSharp.Modules.Parameter(zeros(4));
        using var c = new TorchSharp.Modules.Parameter(zeros(2));
        a.grad = arange(6, dtype: ScalarType.Float32).reshape(2, 3);
        c.grad = tensor(new float[] { -1, 0.5f });
        var (loss, stop) = dp.ReduceGradients([a, b, c], 1.25, stopRequested: false, step: 7);
        Assert.Equal((3.75, false), (loss, stop));
        Assert.Equal(1, world.FloatCalls); // one flat buffer for all parameters
        Assert.Equal(12, world.LastFloatLength);
        Assert.Equal([0f, 3, 6, 9, 12, 15], a.grad!.data<float>().ToArray());
        Assert.Equal([2, 3], a.grad!.shape);
        Assert.Equal([0f, 0, 0, 0], b.grad!.data<float>().ToArray());
        Assert.Equal([-3f, 1.5f], c.grad!.data<float>().ToArray());
    }

    /// <summary>A world of N ranks seen from rank 0 in which every rank holds the same data: a sum is N times the buffer.</summary>
    sealed class FakeWorld(int size) : ICollectives
    {
        public int FloatCalls { get; private set; }
        public int LastFloatLength { get; private set; }
        public int Rank => 0;
        public int WorldSize => size;
        public string Description => "fake";
        public void AllReduceSum(Span<float> buffer, string what)
        {
            FloatCalls++;
            LastFloatLength = buffer.Length;
            foreach (ref var x in buffer) x *= size;
        }
        public void AllReduceSum(Span<double> buffer, string what)
        {
            foreach (ref var x in buffer) x *= size;
        }
        public void Broadcast(Span<byte> buffer, int root, string what) => throw new NotSupportedException();
        public void Barrier(string what) => throw new NotSupportedException();
        public byte[] AllGather(ReadOnlySpan<byte> local, string what) => throw new NotSupportedException();
    }
}
