namespace QLora.Trainer;

/// <summary>
/// Samples resident anonymous memory on a background thread and keeps the maximum, because the kernel keeps a
/// high-water mark only for total RSS (which includes memory-mapped files). Also samples on demand
/// (<see cref="Sample"/>) at the points a caller knows are peaks.
/// </summary>
public sealed class PeakMemorySampler : IDisposable
{
    readonly Thread thread;
    readonly CancellationTokenSource stop = new();
    readonly TimeSpan interval;
    readonly Func<long> read;
    readonly bool aboveBaseline;
    long peak;

    /// <summary>Starts sampling resident anonymous memory every <paramref name="intervalMs"/> milliseconds.</summary>
    public PeakMemorySampler(int intervalMs = 5) : this(ResidentMemory.AnonymousBytes, reportAboveBaseline: false, intervalMs)
    {
    }

    /// <summary>
    /// Starts sampling <paramref name="source"/> (e.g. a CUDA device's used memory) every <paramref name="intervalMs"/>
    /// milliseconds; with <paramref name="reportAboveBaseline"/>, <see cref="ReportedPeakBytes"/> is the peak above the
    /// baseline (for a device shared with other work) instead of the peak itself.
    /// </summary>
    public PeakMemorySampler(Func<long> source, bool reportAboveBaseline, int intervalMs = 5)
    {
        read = source;
        aboveBaseline = reportAboveBaseline;
        interval = TimeSpan.FromMilliseconds(intervalMs);
        Baseline = read();
        peak = Baseline;
        thread = new Thread(Loop) { IsBackground = true, Name = "peak-memory-sampler" };
        thread.Start();
    }

    /// <summary>Resident anonymous bytes when sampling started.</summary>
    public long Baseline { get; }

    /// <summary>The largest resident anonymous size seen so far, in bytes.</summary>
    public long PeakBytes => Interlocked.Read(ref peak);

    /// <summary>The peak above the baseline: what the work since construction added.</summary>
    public long PeakAboveBaseline => PeakBytes - Baseline;

    /// <summary>The figure a run reports: the peak, or for a shared device the peak above the baseline.</summary>
    public long ReportedPeakBytes => aboveBaseline ? PeakAboveBaseline : PeakBytes;

    /// <summary>Takes one sample now and returns it.</summary>
    public long Sample()
    {
        long now = read();
        long seen;
        while (now > (seen = Interlocked.Read(ref peak)) && Interlocked.CompareExchange(ref peak, now, seen) != seen) { }
        return now;
    }

    /// <summary>Restarts the peak from the current value.</summary>
    public void Reset() => Interlocked.Exchange(ref peak, read());

    void Loop()
    {
        while (!stop.IsCancellationRequested)
        {
            Sample();
            stop.Token.WaitHandle.WaitOne(interval);
        }
    }

    /// <summary>Stops the sampling thread.</summary>
    public void Dispose()
    {
        stop.Cancel();
        thread.Join();
        stop.Dispose();
    }
}
