using System.Diagnostics;
using QLora.Quant;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Layer streaming: the 4-bit decoder weights stay in host memory — the memory-mapped bnb-4bit checkpoint — and each
/// layer's packed codes and absmax are copied into device memory (on the CPU backend: one anonymous buffer per layer)
/// just before the layer runs, in the forward and again in the backward recompute. At most <see cref="Window"/> layers
/// are resident at any moment (default 2: the one computing and the one being prefetched); the least recently used
/// layer is released to make room. <see cref="Acquire"/> starts copying the next layer on a background task while the
/// current one computes. A 4-bit weight used while its layer is not resident (e.g. backward without checkpointing)
/// is brought in synchronously, so results never depend on the schedule: they equal the non-streamed model's bit for bit.
/// On a CUDA device the resident buffers are device memory, filled through page-locked staging buffers on a copy
/// stream of the project's own (<see cref="CudaLayerBuffers"/>); the residency logic is the same.
/// The streamer owns the checkpoint and closes it on <see cref="Dispose"/>.
/// </summary>
public sealed unsafe class LayerStreamer : IFourBitProjectionFactory, IDisposable
{
    private readonly SafetensorsCheckpoint _checkpoint;
    private readonly StreamedLayerWeights[] _layers;
    private readonly LinkedList<int> _resident = new(); // least recently used first
    private readonly object _lock = new();
    private readonly ILayerBuffers _buffers;
    private long _waitTicks;
    private bool _disposed;

    /// <summary>
    /// Streams the decoder layers of <paramref name="checkpoint"/> (a bnb-4bit checkpoint of <paramref name="layers"/>
    /// layers), keeping at most <paramref name="window"/> resident on <paramref name="device"/> (default: the CPU backend).
    /// Takes ownership of the checkpoint.
    /// </summary>
    public LayerStreamer(SafetensorsCheckpoint checkpoint, int layers, int window = 2, Device? device = null)
        : this(checkpoint, layers, window, device ?? CPU, device is { type: DeviceType.CUDA } d
            ? new CudaLayerBuffers(QLora.Kernels.CudaKernelLauncher.ForDevice(Math.Max(0, d.index)))
            : new HostLayerBuffers())
    {
    }

    /// <summary>Streams into <paramref name="buffers"/> (tests use this to slow or watch the copies).</summary>
    internal LayerStreamer(SafetensorsCheckpoint checkpoint, int layers, int window, Device device, ILayerBuffers buffers)
    {
        ArgumentNullException.ThrowIfNull(checkpoint);
        if (window < 1) throw new ArgumentOutOfRangeException(nameof(window), $"stream window {window}: at least one layer must be resident");
        ArgumentOutOfRangeException.ThrowIfNegative(layers);
        _checkpoint = checkpoint;
        Window = window;
        Device = device;
        _buffers = buffers;
        _layers = Enumerable.Range(0, layers).Select(i => new StreamedLayerWeights(this, i)).ToArray();
    }

    /// <summary>The device the resident layers live on and the streamed projections compute on.</summary>
    public Device Device { get; }

    /// <summary>Most layers resident at once.</summary>
    public int Window { get; }
    /// <summary>The streamed layers.</summary>
    public IReadOnlyList<StreamedLayerWeights> Layers => _layers;
    /// <summary>Layers resident now (being copied in counts as resident: its buffer exists).</summary>
    public int ResidentLayers { get { lock (_lock) return _resident.Count; } }
    /// <summary>The largest number of layers resident at once so far.</summary>
    public int MaxResidentLayers { get; private set; }
    /// <summary>Bytes of resident layer buffers now.</summary>
    public long ResidentBytes { get { lock (_lock) return _resident.Sum(i => _layers[i].Bytes); } }
    /// <summary>Layer copies made so far (prefetched or synchronous).</summary>
    public int Loads { get; private set; }
    /// <summary>Copies made on the compute thread because a layer was used without having been prefetched.</summary>
    public int SynchronousLoads { get; private set; }
    /// <summary>Seconds the compute thread spent waiting for a layer's copy (prefetch not finished, or synchronous).</summary>
    public double WaitSeconds => (double)Interlocked.Read(ref _waitTicks) / Stopwatch.Frequency;
    /// <summary>Bytes of the largest layer buffer: what one resident layer costs.</summary>
    public long LargestLayerBytes => _layers.Length == 0 ? 0 : _layers.Max(l => l.Bytes);

    /// <summary>Called (under the streamer's lock) with the resident layer indices after every load or release.</summary>
    public Action<IReadOnlyList<int>>? ResidencyChanged { get; set; }

    /// <summary>
    /// Registers the bnb 4-bit weight <paramref name="weightName"/> (<c>model.layers.N....weight</c>) with layer N and
    /// returns a <see cref="Linear4bit"/> that reads it from the stream.
    /// </summary>
    public Linear4bit Create(string weightName, long[] shape, Tensor? bias, ScalarType computeDType)
    {
        int layer = LayerIndex(weightName);
        if (layer >= _layers.Length) throw new ArgumentException($"{weightName}: layer {layer} is past the {_layers.Length} streamed layers");
        if (!BnbCheckpointLayout.IsQuantized(_checkpoint, weightName))
            throw new InvalidDataException($"{weightName} is not stored 4-bit: layer streaming reads bnb-4bit checkpoints (quantize the model first with 'qlora quantize')");
        var weight = _layers[layer].Add(_checkpoint, weightName);
        if (!weight.State.Shape.SequenceEqual(shape))
            throw new ArgumentException($"weight {weightName} has shape [{string.Join(", ", weight.State.Shape)}], the config implies [{string.Join(", ", shape)}]");
        return new Linear4bit(weight, bias, computeDType);
    }

    /// <summary>
    /// Makes layer <paramref name="layer"/> resident (waiting for its prefetch, or copying it now), then starts copying
    /// <paramref name="next"/> (ignored when out of range or the window is 1) in the background, releasing least
    /// recently used layers so that no more than <see cref="Window"/> are resident.
    /// </summary>
    public void Acquire(int layer, int next)
    {
        EnsureResident(layer);
        if (next < 0 || next >= _layers.Length || next == layer || Window < 2) return;
        lock (_lock)
        {
            ThrowIfDisposed();
            if (_resident.Contains(next)) return;
            MakeRoom(keep: layer);
            var target = _layers[next];
            Admit(next);
            target.Loading = Task.Run(() => Copy(target));
        }
    }

    /// <summary>Address of the resident buffer of <paramref name="weight"/>'s layer, copying it in now if needed.</summary>
    internal FourBitPointers Pointers(StreamedFourBitWeight weight)
    {
        var layer = weight.Layer;
        EnsureResident(layer.Index);
        lock (_lock) return weight.Pointers(layer.Buffer);
    }

    private void EnsureResident(int index)
    {
        if ((uint)index >= (uint)_layers.Length) throw new ArgumentOutOfRangeException(nameof(index), $"layer {index} of {_layers.Length}");
        var layer = _layers[index];
        Task? pending;
        long start = Stopwatch.GetTimestamp();
        lock (_lock)
        {
            ThrowIfDisposed();
            if (_resident.Contains(index))
            {
                _resident.Remove(index); // most recently used goes last
                _resident.AddLast(index);
                pending = layer.Loading;
            }
            else
            {
                MakeRoom(keep: -1, free: 1);
                Admit(index);
                SynchronousLoads++;
                pending = null;
                Copy(layer);
                Interlocked.Add(ref _waitTicks, Stopwatch.GetTimestamp() - start);
                return;
            }
        }
        if (pending is not null)
        {
            pending.GetAwaiter().GetResult(); // a failed copy surfaces here
            Interlocked.Add(ref _waitTicks, Stopwatch.GetTimestamp() - start);
            lock (_lock) if (ReferenceEquals(layer.Loading, pending)) layer.Loading = null;
        }
    }

    /// <summary>Allocates a layer's buffer and records it as resident (lock held).</summary>
    private void Admit(int index)
    {
        var layer = _layers[index];
        layer.Buffer = _buffers.Rent(layer.Bytes);
        _resident.AddLast(index);
        Loads++;
        MaxResidentLayers = Math.Max(MaxResidentLayers, _resident.Count);
        ResidencyChanged?.Invoke(_resident.ToArray());
    }

    /// <summary>Releases least recently used layers other than <paramref name="keep"/> until <paramref name="free"/> slots are free (lock held).</summary>
    private void MakeRoom(int keep, int free = 1)
    {
        var node = _resident.First;
        while (_resident.Count + free > Window && node is not null)
        {
            var following = node.Next;
            if (node.Value != keep)
            {
                var layer = _layers[node.Value];
                try { layer.Loading?.GetAwaiter().GetResult(); } // never free a buffer under a running copy
                catch (Exception) { } // the copy's failure no longer matters: its buffer goes
                layer.Loading = null;
                _buffers.Return(layer.Buffer);
                layer.Buffer = 0;
                _resident.Remove(node);
                ResidencyChanged?.Invoke(_resident.ToArray());
            }
            node = following;
        }
        if (_resident.Count + free > Window) throw new InvalidOperationException($"cannot keep layer streaming within a window of {Window}");
    }

    /// <summary>Copies a layer's parts from the memory map into its buffer (any thread).</summary>
    private void Copy(StreamedLayerWeights layer) => _buffers.Fill(layer.Buffer, layer.Bytes, host =>
    {
        byte* destination = (byte*)host;
        foreach (var w in layer.Weights)
            foreach (var (key, offset, bytes) in w.Parts)
                System.Buffer.MemoryCopy((void*)_checkpoint.GetPointer(key), destination + offset, bytes, bytes);
    });

    private static int LayerIndex(string weightName)
    {
        const string prefix = "model.layers.";
        int end = weightName.StartsWith(prefix, StringComparison.Ordinal) ? weightName.IndexOf('.', prefix.Length) : -1;
        if (end < 0 || !int.TryParse(weightName.AsSpan(prefix.Length, end - prefix.Length), out int layer))
            throw new ArgumentException($"{weightName} is not a decoder-layer weight (model.layers.N....): only decoder layers are streamed");
        return layer;
    }

    private void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(_disposed, this);

    /// <summary>Waits for copies in flight, releases every resident layer and closes the checkpoint.</summary>
    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed) return;
            foreach (var i in _resident)
            {
                var layer = _layers[i];
                try { layer.Loading?.GetAwaiter().GetResult(); }
                catch (Exception) { }
                layer.Loading = null;
                _buffers.Return(layer.Buffer);
                layer.Buffer = 0;
            }
            _resident.Clear();
            _disposed = true;
            _buffers.Dispose();
        }
        _checkpoint.Dispose();
    }
}
