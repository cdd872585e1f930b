using QLora.Kernels;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Offloaded checkpoints on a CUDA device: each slot's host copy is page-locked memory, and both directions run on a
/// non-blocking copy stream of the project's own while torch computes on the legacy default stream.
/// Store: an event recorded on the compute stream after the input was written, the copy stream waits for it, copies
/// device → host; the input's storage is kept until that copy has run (its memory must not be handed to other tensors
/// under a running copy), which is checked at the next store and at the end of the forward, so at most one stored
/// input besides the current one stays on the device. Fetch: a new device tensor, an event on the compute stream
/// (whatever last used its memory was queued before it was allocated), the copy stream waits for it and copies host →
/// device, and the compute stream waits for that copy on the device before the recompute reads the tensor. The host
/// never waits for a copy except to release a stored input.
/// </summary>
internal sealed unsafe class CudaActivationCopies : IDisposable
{
    private sealed class Slot
    {
        public nint Host;
        public long Capacity;
        public nint Mark;    // recorded on the compute stream: the copy stream waits for it
        public nint Stored;  // recorded on the copy stream after the device → host copy
        public nint Fetched; // recorded on the copy stream after the host → device copy
        public Tensor? Pending; // the stored input, kept until its copy has run
    }

    private const nint ComputeStream = 0;
    private readonly CudaKernelLauncher _launcher;
    private readonly CudaDriver _driver;
    private readonly nint _copyStream;
    private readonly List<Slot> _slots = [];
    private readonly Lock _lock = new();
    private bool _disposed;

    /// <summary>Copies for the device of <paramref name="launcher"/>.</summary>
    public CudaActivationCopies(CudaKernelLauncher launcher)
    {
        _launcher = launcher;
        _driver = launcher.Driver;
        _launcher.MakeCurrent();
        _copyStream = _driver.CreateStream(CudaDriver.StreamNonBlocking);
    }

    /// <summary>Bytes of page-locked host memory the slots hold.</summary>
    public long HostBytes { get { lock (_lock) return _slots.Sum(s => s.Capacity); } }

    private Slot SlotAt(int index)
    {
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            while (_slots.Count <= index)
                _slots.Add(new Slot
                {
                    Mark = _driver.CreateEvent(CudaDriver.EventDisableTiming),
                    Stored = _driver.CreateEvent(CudaDriver.EventDisableTiming),
                    Fetched = _driver.CreateEvent(CudaDriver.EventDisableTiming),
                });
            return _slots[index];
        }
    }

    /// <summary>Queues the copy of <paramref name="input"/> (a CUDA tensor) into slot <paramref name="index"/>'s host memory; releases the previous slot's input once its copy has run. Compute thread.</summary>
    public void Store(int index, Tensor input)
    {
        _launcher.MakeCurrent();
        var slot = SlotAt(index);
        var contiguous = input.detach().contiguous(); // a handle of its own: the storage outlives the caller's
        long bytes = contiguous.numel() * contiguous.element_size();
        if (slot.Capacity < bytes)
        {
            if (slot.Host != 0)
            {
                _driver.SynchronizeEvent(slot.Fetched); // the last step's fetch may still read it
                _driver.SynchronizeEvent(slot.Stored);
                _driver.FreeHost(slot.Host);
                slot.Host = 0;
                slot.Capacity = 0;
            }
            slot.Host = _driver.AllocateHost(bytes);
            slot.Capacity = bytes;
        }
        _driver.RecordEvent(slot.Mark, ComputeStream);
        _driver.StreamWaitEvent(_copyStream, slot.Mark);
        CopyToHostAsync(slot.Host, TensorMemory.DataPointer(contiguous), bytes);
        _driver.RecordEvent(slot.Stored, _copyStream);
        slot.Pending?.Dispose();
        slot.Pending = contiguous;
        if (index > 0) Release(SlotAt(index - 1));
    }

    /// <summary>Waits for every stored input's copy and releases the inputs (the end of the forward). Compute thread.</summary>
    public void FinishStores()
    {
        _launcher.MakeCurrent();
        List<Slot> slots;
        lock (_lock) slots = [.. _slots];
        foreach (var slot in slots) Release(slot);
    }

    private void Release(Slot slot)
    {
        if (slot.Pending is null) return;
        _driver.SynchronizeEvent(slot.Stored);
        slot.Pending.Dispose();
        slot.Pending = null;
    }

    /// <summary>A new device tensor whose host → device copy from slot <paramref name="index"/> is queued (any thread); pass it to <see cref="BeforeUse"/> on the compute thread before reading it.</summary>
    public Tensor Load(int index, long[] shape, ScalarType dtype, Device device)
    {
        _launcher.MakeCurrent();
        var slot = SlotAt(index);
        var t = empty(shape, dtype: dtype, device: device);
        long bytes = t.numel() * t.element_size();
        _driver.RecordEvent(slot.Mark, ComputeStream); // what used t's memory before was queued before this
        _driver.StreamWaitEvent(_copyStream, slot.Mark);
        _driver.CopyToDeviceAsync((ulong)TensorMemory.DataPointer(t), (void*)slot.Host, bytes, _copyStream); // after the slot's store: same stream
        _driver.RecordEvent(slot.Fetched, _copyStream);
        return t;
    }

    /// <summary>Makes the compute stream wait (on the device) for slot <paramref name="index"/>'s host → device copy. Compute thread.</summary>
    public void BeforeUse(int index)
    {
        _launcher.MakeCurrent();
        _driver.StreamWaitEvent(ComputeStream, SlotAt(index).Fetched);
    }

    private void CopyToHostAsync(nint host, nint device, long bytes) =>
        _driver.CopyToHostAsync((void*)host, (ulong)device, bytes, _copyStream);

    /// <summary>Waits for the copies, then frees the pinned memory, the events and the stream.</summary>
    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed) return;
            _disposed = true;
            _launcher.MakeCurrent();
            _driver.TrySynchronize();
            foreach (var slot in _slots)
            {
                slot.Pending?.Dispose();
                if (slot.Host != 0) _driver.FreeHost(slot.Host);
                _driver.DestroyEvent(slot.Mark);
                _driver.DestroyEvent(slot.Stored);
                _driver.DestroyEvent(slot.Fetched);
            }
            _slots.Clear();
            _driver.DestroyStream(_copyStream);
        }
    }
}
