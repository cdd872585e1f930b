using QLora.Kernels;

namespace QLora.Trainer;

/// <summary>
/// Resident layers on a CUDA device. Each slot is a device buffer with a page-locked host staging buffer of the same
/// size: a layer is written from the memory-mapped checkpoint into the staging buffer (on the prefetch thread), copied
/// to the device on a non-blocking copy stream of the project's own, and the fill returns when that copy has completed,
/// while torch keeps computing on the legacy default stream. Slots are reused, never freed during a run: giving a slot
/// back records an event on the compute stream, and the next copy into that slot waits for it on the device, so a
/// layer is never overwritten while kernels queued before its release still read it. At most as many slots exist as
/// layers were ever resident at once (the streamer's window).
/// </summary>
internal sealed unsafe class CudaLayerBuffers : ILayerBuffers
{
    private const nint ComputeStream = 0; // torch's work (and this project's kernels) run on the legacy default stream

    private sealed class Slot
    {
        public ulong Device;
        public long Capacity;
        public nint Staging;
        public nint Released; // recorded on the compute stream when the slot was given back
        public bool HasReleased;
        public nint Ready; // recorded on the copy stream after the slot's copy
    }

    private readonly CudaKernelLauncher _launcher;
    private readonly CudaDriver _driver;
    private readonly nint _copyStream;
    private readonly Lock _lock = new();
    private readonly List<Slot> _free = [];
    private readonly Dictionary<nint, Slot> _rented = [];
    private bool _disposed;

    /// <summary>Layer buffers on the device of <paramref name="launcher"/> (its primary context, libtorch's).</summary>
    public CudaLayerBuffers(CudaKernelLauncher launcher)
    {
        _launcher = launcher;
        _driver = launcher.Driver;
        _launcher.MakeCurrent();
        _copyStream = _driver.CreateStream(CudaDriver.StreamNonBlocking);
    }

    /// <summary>Slots allocated so far (device buffer + staging buffer each).</summary>
    public int Slots { get { lock (_lock) return _free.Count + _rented.Count; } }

    /// <inheritdoc />
    public nint Rent(long bytes)
    {
        bytes = Math.Max(bytes, 1);
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            _launcher.MakeCurrent();
            var slot = _free.FirstOrDefault(s => s.Capacity >= bytes) ?? _free.FirstOrDefault();
            if (slot is null)
            {
                slot = new Slot
                {
                    Released = _driver.CreateEvent(CudaDriver.EventDisableTiming),
                    Ready = _driver.CreateEvent(CudaDriver.EventDisableTiming),
                };
            }
            else
            {
                _free.Remove(slot);
            }
            if (slot.Capacity < bytes)
            {
                // Too small (layers of different sizes): replace its memory once the compute that read it is done.
                if (slot.HasReleased) _driver.SynchronizeEvent(slot.Released);
                if (slot.Device != 0) _driver.Free(slot.Device);
                if (slot.Staging != 0) _driver.FreeHost(slot.Staging);
                (slot.Device, slot.Staging, slot.Capacity) = (0, 0, 0); // nothing left to free twice if an allocation below fails
                slot.Device = _driver.Allocate(bytes);
                slot.Staging = _driver.AllocateHost(bytes);
                slot.Capacity = bytes;
            }
            _rented.Add((nint)slot.Device, slot);
            return (nint)slot.Device;
        }
    }

    /// <inheritdoc />
    public void Fill(nint buffer, long bytes, Action<nint> write)
    {
        Slot slot;
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            slot = _rented[buffer];
        }
        if (bytes > slot.Capacity) throw new ArgumentOutOfRangeException(nameof(bytes), $"{bytes} bytes into a {slot.Capacity}-byte layer buffer");
        _launcher.MakeCurrent(); // the prefetch runs on a pool thread: the primary context must be current there
        write(slot.Staging); // the staging buffer is idle: the slot's previous fill waited for its copy
        if (slot.HasReleased) _driver.StreamWaitEvent(_copyStream, slot.Released); // kernels that read the slot's last layer go first
        _driver.CopyToDeviceAsync(slot.Device, (void*)slot.Staging, bytes, _copyStream);
        _driver.RecordEvent(slot.Ready, _copyStream);
        _driver.SynchronizeEvent(slot.Ready); // blocks this thread only: compute goes on meanwhile
    }

    /// <inheritdoc />
    public void Return(nint buffer)
    {
        lock (_lock)
        {
            if (_disposed) return;
            var slot = _rented[buffer];
            _rented.Remove(buffer);
            _launcher.MakeCurrent();
            _driver.RecordEvent(slot.Released, ComputeStream);
            slot.HasReleased = true;
            _free.Add(slot);
        }
    }

    /// <summary>Waits for the device, then frees every slot, its events and the copy stream.</summary>
    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed) return;
            _disposed = true;
            _launcher.MakeCurrent();
            _driver.TrySynchronize(); // nothing may still read or write a slot; a fault has surfaced elsewhere already
            foreach (var slot in _free.Concat(_rented.Values))
            {
                if (slot.Device != 0) _driver.Free(slot.Device);
                if (slot.Staging != 0) _driver.FreeHost(slot.Staging);
                _driver.DestroyEvent(slot.Released);
                _driver.DestroyEvent(slot.Ready);
            }
            _free.Clear();
            _rented.Clear();
            _driver.DestroyStream(_copyStream);
        }
    }
}
