using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Offloaded checkpoints: each checkpointed layer's input leaves device memory as soon as its forward has run and
/// comes back for its backward recompute. The host copy lives in paged memory (<see cref="OptimizerStateMemory"/> with
/// paging: on the CPU backend a memory-mapped scratch file, so it is file-backed and not anonymous memory); a CUDA input
/// goes to page-locked host memory on a copy stream of the project's own (<see cref="CudaActivationCopies"/>), through
/// the same <see cref="Store"/> / <see cref="Fetch"/> calls.
/// The backward runs the layers in reverse, so <see cref="Fetch"/> of one slot starts bringing back the one before it
/// (<see cref="Prefetch"/>) while the current layer recomputes. Slots are reused step after step: the scratch file is
/// sized once by the first step. Copies are bytes, so results are bit-identical to keeping the inputs on the device.
/// </summary>
public sealed class ActivationOffload : IDisposable
{
    private readonly List<OptimizerStateMemory?> _blocks = [];
    private readonly List<(long[] Shape, ScalarType DType, Device Device)?> _slots = [];
    private readonly Dictionary<int, Task<Tensor>> _prefetched = [];
    private CudaActivationCopies? _cuda;
    private int _next;
    private bool _disposed;

    /// <summary>Slots stored in the current step (reset by <see cref="StartStep"/>).</summary>
    public int Stored => _next;
    /// <summary>Bytes of host memory the slots hold.</summary>
    public long HostBytes => _blocks.Sum(b => b?.Length ?? 0) + (_cuda?.HostBytes ?? 0);
    /// <summary>Copies brought back ahead of their use.</summary>
    public int Prefetches { get; private set; }

    /// <summary>Starts a new forward: slots are numbered from 0 again (the old contents are no longer needed).</summary>
    public void StartStep()
    {
        foreach (var t in _prefetched.Values) t.Result.Dispose();
        _prefetched.Clear();
        _next = 0;
    }

    /// <summary>Copies <paramref name="input"/> to host memory; returns its slot.</summary>
    public unsafe int Store(Tensor input)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        int slot = _next++;
        long bytes = input.numel() * input.element_size();
        while (_blocks.Count <= slot) { _blocks.Add(null); _slots.Add(null); }
        if (input.device_type == DeviceType.CUDA)
        {
            _cuda ??= new CudaActivationCopies(QLora.Kernels.CudaKernelLauncher.ForDevice(Math.Max(0, input.device.index)));
            _cuda.Store(slot, input);
            _slots[slot] = (input.shape, input.dtype, input.device);
            return slot;
        }
        if (_blocks[slot] is not { } block || block.Length < bytes)
        {
            _blocks[slot]?.Dispose();
            _blocks[slot] = block = new OptimizerStateMemory(bytes, paged: true);
        }
        using (var contiguous = input.detach().contiguous())
        using (var host = contiguous.device_type == DeviceType.CPU ? contiguous.alias() : contiguous.to(CPU))
            Buffer.MemoryCopy((void*)TensorMemory.DataPointer(host), block.At(0), bytes, bytes);
        _slots[slot] = (input.shape, input.dtype, input.device);
        return slot;
    }

    /// <summary>Starts bringing <paramref name="slot"/> back on a background task (nothing when out of range or already coming).</summary>
    public void Prefetch(int slot)
    {
        if (slot < 0 || slot >= _next || _prefetched.ContainsKey(slot) || _slots[slot] is null) return;
        _prefetched[slot] = Task.Run(() => Load(slot));
        Prefetches++;
    }

    /// <summary>The stored input of <paramref name="slot"/> as a new device tensor (the caller disposes it); prefetches slot − 1.</summary>
    public Tensor Fetch(int slot)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        Tensor result;
        if (_prefetched.Remove(slot, out var pending)) result = pending.Result;
        else result = Load(slot);
        if (result.device_type == DeviceType.CUDA) _cuda!.BeforeUse(slot);
        Prefetch(slot - 1);
        return result;
    }

    /// <summary>The forward's last store has been made: on CUDA, waits for the stored inputs' copies and frees them on the device (the CPU backend copies synchronously).</summary>
    public void FinishStores() => _cuda?.FinishStores();

    private unsafe Tensor Load(int slot)
    {
        var (shape, dtype, device) = _slots[slot] ?? throw new InvalidOperationException($"offload slot {slot} holds nothing");
        if (device.type == DeviceType.CUDA) return _cuda!.Load(slot, shape, dtype, device);
        var t = empty(shape, dtype: dtype);
        long bytes = t.numel() * t.element_size();
        Buffer.MemoryCopy(_blocks[slot]!.At(0), (void*)TensorMemory.DataPointer(t), bytes, bytes);
        if (device.type == DeviceType.CPU) return t;
        using (t) return t.to(device);
    }

    /// <summary>Releases every slot and its scratch memory.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        foreach (var t in _prefetched.Values) t.Result.Dispose();
        _prefetched.Clear();
        foreach (var b in _blocks) b?.Dispose();
        _blocks.Clear();
        _cuda?.Dispose();
    }
}
