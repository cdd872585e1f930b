using System.Runtime;

namespace QLora.Trainer;

/// <summary>
/// The .NET heap's share of resident memory. Building a model leaves managed garbage (quantize-on-load's packed codes
/// and absmax arrays, quant states, JSON), mostly on the large-object heap, which a background GC frees but does not
/// return to the system until the heap is compacted: on a 7B job that stayed resident through the training step.
/// <see cref="ReturnFreeMemory"/> collects and compacts once so the step starts from what the model really holds.
/// </summary>
public static class ManagedHeap
{
    /// <summary>A blocking, compacting full collection that also compacts the large-object heap and decommits free memory.</summary>
    public static void ReturnFreeMemory()
    {
        GCSettings.LargeObjectHeapCompactionMode = GCLargeObjectHeapCompactionMode.CompactOnce;
        GC.Collect(2, GCCollectionMode.Aggressive, blocking: true, compacting: true);
    }

    /// <summary>
    /// <see cref="ReturnFreeMemory"/> once more than <paramref name="bytes"/> were allocated on the managed heap since
    /// <paramref name="mark"/> (which then moves on). Loading builds each 4-bit weight from managed arrays that die at once
    /// (a bnb-4bit checkpoint's parts, or quantize-on-load's codes); without this the heap kept them all until the load
    /// ended (a 7B bnb-4bit folder: 1.2 GB above the plan while loading).
    /// </summary>
    public static void ReturnFreeMemoryEvery(long bytes, ref long mark)
    {
        if (GC.GetTotalAllocatedBytes() - mark < bytes) return;
        ReturnFreeMemory();
        mark = GC.GetTotalAllocatedBytes();
    }
}
