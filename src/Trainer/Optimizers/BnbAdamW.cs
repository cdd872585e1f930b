using System.Globalization;
using System.Runtime.InteropServices;
using QLora.Kernels;
using QLora.Quant;
using BFloat16 = QLora.Quant.BFloat16;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// AdamW with bitsandbytes' semantics, for the LoRA parameters: float32 moments, or 8-bit blockwise moments (256 per
/// block, signed map for the first, unsigned for the second, float32 state kept for tensors under
/// <see cref="AdamWOptions.MinEightBitSize"/> elements); bias correction folded into the step size and epsilon;
/// decoupled weight decay after the update; an element whose gradient is not finite gets zeroed moments and no update.
/// Paged: the state lives in host memory and each tensor's state is brought into device memory for its update and
/// written back, so device memory holds at most one tensor's state (bitsandbytes pages per tensor too).
/// Parameters (float32 or bfloat16) live on the CPU or on one CUDA device. On CUDA the state is one device buffer
/// (paged: one tensor's worth, filled and emptied with driver copies on the default stream), the 8-bit update is the
/// ILGPU kernel (<see cref="CudaAdamW8bit"/>) and the 32-bit update is the same arithmetic in tensor operations.
/// </summary>
public sealed unsafe class BnbAdamW : IDisposable
{
    private sealed record Slot(string Name, TorchSharp.Modules.Parameter Parameter, long Count, bool EightBit, long Offset, long Bytes)
    {
        public int Blocks => (int)((Count + AdamW8bitStep.Blocksize - 1) / AdamW8bitStep.Blocksize);
    }

    private sealed record Group(ParameterGroup Source, IReadOnlyList<Slot> Slots, long Offset, long Bytes, double LearningRate);

    private readonly List<Group> _groups = [];
    private readonly OptimizerStateMemory? _state;   // host: the CPU state, or the paged state of any device; null for unpaged CUDA
    private readonly OptimizerStateMemory? _scratch; // CPU, paged: one tensor's state
    private readonly Tensor? _deviceState;           // CUDA: the whole state, or (paged) one tensor's; float32 elements, byte offsets
    private readonly long _deviceBytes;
    private readonly CudaKernelLauncher? _launcher;

    /// <summary>Sets up zeroed state for every parameter of <paramref name="groups"/>.</summary>
    public BnbAdamW(IEnumerable<ParameterGroup> groups, AdamWOptions options)
    {
        options.Validate();
        Options = options;
        var names = new HashSet<string>(StringComparer.Ordinal);
        long offset = 0, largest = 0;
        Device? device = null;
        foreach (var g in groups)
        {
            var slots = new List<Slot>();
            long groupStart = offset;
            foreach (var (name, p) in g.Parameters)
            {
                if (!names.Add(name)) throw new ArgumentException($"parameter name '{name}' appears twice");
                device ??= p.device;
                if (p.device_type != device.type || p.device_type == DeviceType.CUDA && p.device.index != device.index)
                    throw new ArgumentException($"{name}: this parameter is on {p.device}, earlier ones on {device}; one optimizer updates the parameters of one device");
                if (p.device_type is not (DeviceType.CPU or DeviceType.CUDA))
                    throw new NotSupportedException($"{name}: BnbAdamW updates CPU or CUDA tensors; this parameter is on {p.device}");
                if (p.dtype is not (ScalarType.Float32 or ScalarType.BFloat16))
                    throw new NotSupportedException($"{name}: parameters must be float32 or bfloat16, not {p.dtype}");
                if (!p.is_contiguous()) throw new ArgumentException($"{name}: parameter is not contiguous");
                long n = p.numel();
                bool eightBit = options.StateBits == 8 && n >= options.MinEightBitSize;
                long blocks = (n + AdamW8bitStep.Blocksize - 1) / AdamW8bitStep.Blocksize;
                long bytes = eightBit ? Align(2 * n) + 8 * blocks : 8 * n;
                slots.Add(new Slot(name, p, n, eightBit, offset - groupStart, bytes));
                offset += Align(bytes);
            }
            long groupBytes = offset - groupStart;
            foreach (var slot in slots) largest = Math.Max(largest, slot.Bytes);
            _groups.Add(new Group(g, slots, groupStart, groupBytes, g.LearningRate ?? options.LearningRate));
        }
        if (device is { type: DeviceType.CUDA })
        {
            _launcher = CudaKernelLauncher.ForDevice(Math.Max(0, device.index));
            if (options.Paged) _state = new OptimizerStateMemory(offset, paged: true);
            _deviceBytes = options.Paged ? largest : offset;
            _deviceState = zeros(Math.Max(1, (_deviceBytes + 3) / 4), dtype: ScalarType.Float32, device: device); // zero codes/moments
        }
        else
        {
            _state = new OptimizerStateMemory(offset, options.Paged);
            if (options.Paged) _scratch = new OptimizerStateMemory(largest, paged: false);
        }
    }

    /// <summary>The hyperparameters.</summary>
    public AdamWOptions Options { get; }

    /// <summary>Number of updates applied so far (bias correction uses it; checkpoints store it).</summary>
    public int StepCount { get; private set; }

    /// <summary>State bytes resident in device memory: everything unpaged, or the largest tensor's when paged.</summary>
    public long DeviceStateBytes => _deviceState is not null ? _deviceBytes : _scratch?.Length ?? _state!.Length;

    /// <summary>State bytes held in host memory (paged only).</summary>
    public long HostStateBytes => _state is { IsPaged: true } ? _state.Length : 0;

    /// <summary>Every parameter, with its group's learning rate.</summary>
    public IEnumerable<(string Name, TorchSharp.Modules.Parameter Parameter, double LearningRate)> Parameters =>
        _groups.SelectMany(g => g.Slots.Select(s => (s.Name, s.Parameter, g.LearningRate)));

    /// <summary>
    /// Multiplies every group's learning rate for the next steps: how a schedule (warmup, cosine or linear decay)
    /// drives the optimizer while LoRA+ ratios between groups stay fixed.
    /// </summary>
    public double LearningRateScale { get; set; } = 1.0;

    /// <summary>Applies one update to every parameter that has a gradient.</summary>
    public void Step()
    {
        StepCount++;
        using var noGrad = torch.no_grad();
        foreach (var g in _groups)
        {
            var step = AdamW8bitStep.Create((float)(g.LearningRate * LearningRateScale), (float)Options.Beta1, (float)Options.Beta2,
                (float)Options.Epsilon, (float)Options.WeightDecay, StepCount);
            foreach (var s in g.Slots)
            {
                if (_deviceState is not null)
                {
                    UpdateOnDevice(g, s, step);
                    continue;
                }
                byte* state = _state!.At(g.Offset + s.Offset);
                if (_scratch is null)
                {
                    Update(s, state, step);
                    continue;
                }
                // Paged: bring this tensor's state in, update it there, write it back.
                Buffer.MemoryCopy(state, _scratch.At(0), s.Bytes, s.Bytes);
                Update(s, _scratch.At(0), step);
                Buffer.MemoryCopy(_scratch.At(0), state, s.Bytes, s.Bytes);
            }
        }
    }

    /// <summary>Clears every parameter's gradient.</summary>
    public void ZeroGrad()
    {
        foreach (var g in _groups)
            foreach (var s in g.Slots)
            {
                using var grad = s.Parameter.grad; // each access wraps a new handle: dispose it
                if (grad is not null) grad.zero_().Dispose(); // so does the in-place op's result
            }
    }

    private static void Update(Slot s, byte* state, in AdamW8bitStep step)
    {
        using var grad = s.Parameter.grad;
        if (grad is null) return;
        if (grad.dtype != s.Parameter.dtype || grad.numel() != s.Count)
            throw new InvalidOperationException($"{s.Name}: gradient {grad.dtype} x {grad.numel()} does not match the parameter {s.Parameter.dtype} x {s.Count}");
        using var g = grad.is_contiguous() ? grad.alias() : grad.contiguous();
        int n = checked((int)s.Count);
        bool bf16 = s.Parameter.dtype == ScalarType.BFloat16;
        if (s.EightBit)
        {
            int blocks = s.Blocks;
            var state1 = new Span<byte>(state, n);
            var state2 = new Span<byte>(state + n, n);
            long absOffset = Align(2L * n);
            var absmax1 = new Span<float>(state + absOffset, blocks);
            var absmax2 = new Span<float>(state + absOffset + 4L * blocks, blocks);
            if (bf16)
                AdamW8bitReference.Update(MemoryMarshal.Cast<byte, ushort>(s.Parameter.bytes), MemoryMarshal.Cast<byte, ushort>(g.bytes),
                    state1, state2, absmax1, absmax2, step);
            else
                AdamW8bitReference.Update(MemoryMarshal.Cast<byte, float>(s.Parameter.bytes), MemoryMarshal.Cast<byte, float>(g.bytes),
                    state1, state2, absmax1, absmax2, step);
            return;
        }
        var m = new Span<float>(state, n);
        var v = new Span<float>(state + 4L * n, n);
        if (!bf16)
        {
            Update32(MemoryMarshal.Cast<byte, float>(s.Parameter.bytes), MemoryMarshal.Cast<byte, float>(g.bytes), m, v, step);
            return;
        }
        // bfloat16 parameters: the update runs in float32 and rounds back to nearest even, as bitsandbytes does.
        var p16 = MemoryMarshal.Cast<byte, ushort>(s.Parameter.bytes);
        var g16 = MemoryMarshal.Cast<byte, ushort>(g.bytes);
        var p32 = new float[n];
        var g32 = new float[n];
        for (int i = 0; i < n; i++) { p32[i] = BFloat16.ToFloat(p16[i]); g32[i] = BFloat16.ToFloat(g16[i]); }
        Update32(p32, g32, m, v, step);
        for (int i = 0; i < n; i++) p16[i] = BFloat16.FromFloat(p32[i]);
    }

    /// <summary>
    /// One parameter's update on its CUDA device: its state is brought into the device buffer first when paged (and
    /// written back after), then the 8-bit kernel or the 32-bit tensor arithmetic runs on the default stream. The driver
    /// copies are synchronous and on the legacy default stream, so they are ordered with the kernels and torch's work.
    /// </summary>
    private void UpdateOnDevice(Group g, Slot s, in AdamW8bitStep step)
    {
        using var grad = s.Parameter.grad;
        if (grad is null) return;
        if (grad.dtype != s.Parameter.dtype || grad.numel() != s.Count)
            throw new InvalidOperationException($"{s.Name}: gradient {grad.dtype} x {grad.numel()} does not match the parameter {s.Parameter.dtype} x {s.Count}");
        using var gc = grad.is_contiguous() ? grad.alias() : grad.contiguous();
        var launcher = _launcher!;
        long hostOffset = g.Offset + s.Offset;
        long offset = _state is null ? hostOffset : 0; // paged: the scratch starts at 0
        nint state = TensorMemory.DataPointer(_deviceState!) + (nint)offset;
        if (_state is not null)
        {
            launcher.MakeCurrent();
            launcher.Driver.CopyToDevice((ulong)state, _state.At(hostOffset), s.Bytes);
        }
        long n = s.Count;
        if (s.EightBit)
        {
            long abs = Align(2 * n);
            new CudaAdamW8bit(launcher).Update(TensorMemory.DataPointer(s.Parameter), TensorMemory.DataPointer(gc), state, state + (nint)n,
                state + (nint)abs, state + (nint)(abs + 4L * s.Blocks), n, step,
                s.Parameter.dtype == ScalarType.BFloat16 ? FloatType.BFloat16 : FloatType.Float32);
        }
        else
        {
            using var m = _deviceState!.narrow(0, offset / 4, n);
            using var v = _deviceState.narrow(0, offset / 4 + n, n);
            UpdateWithTensors(s.Parameter, gc, m, v, step);
        }
        if (_state is not null)
        {
            launcher.MakeCurrent();
            launcher.Driver.CopyToHost(_state.At(hostOffset), (ulong)state, s.Bytes); // waits for the update
        }
    }

    /// <summary>
    /// The float32 AdamW update of <see cref="Update32"/> in tensor operations on any device, operation for operation
    /// (float32 arithmetic; bfloat16 parameters rounded back to nearest even): the CUDA path for 32-bit state.
    /// <paramref name="m"/> and <paramref name="v"/> are float32 tensors of the parameter's element count, updated in place.
    /// </summary>
    internal static void UpdateWithTensors(Tensor param, Tensor grad, Tensor m, Tensor v, in AdamW8bitStep step)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var g = grad.reshape(-1).to(ScalarType.Float32);
        var finite = g.isfinite();
        var g0 = g.masked_fill(finite.logical_not(), 0f);
        var mi = m.mul(step.Beta1).add(g0.mul(step.OneMinusBeta1));
        var vi = v.mul(step.Beta2).add(g0.mul(g0).mul(step.OneMinusBeta2));
        m.copy_(mi.masked_fill(finite.logical_not(), 0f));
        v.copy_(vi.masked_fill(finite.logical_not(), 0f));
        var flat = param.view(-1);
        var p32 = flat.to(ScalarType.Float32);
        var x = p32.add(mi.div(vi.sqrt().add(step.EpsilonTerm)).mul(step.StepSize)).mul(step.DecayFactor);
        flat.copy_(where(finite, x, p32).to(param.dtype));
    }

    /// <summary>The float32 update, with the same operations in the same order as the 8-bit one.</summary>
    private static void Update32(Span<float> p, ReadOnlySpan<float> grad, Span<float> m, Span<float> v, in AdamW8bitStep step)
    {
        for (int i = 0; i < p.Length; i++)
        {
            float g = grad[i];
            if (!float.IsFinite(g))
            {
                m[i] = 0f;
                v[i] = 0f;
                continue;
            }
            float mi = m[i] * step.Beta1 + step.OneMinusBeta1 * g;
            float vi = v[i] * step.Beta2 + step.OneMinusBeta2 * (g * g);
            m[i] = mi;
            v[i] = vi;
            float x = p[i] + step.StepSize * (mi / (MathF.Sqrt(vi) + step.EpsilonTerm));
            p[i] = x * step.DecayFactor;
        }
    }

    /// <summary>
    /// Writes the state (moments or codes and absmax per parameter, the step count and the hyperparameters) to a
    /// safetensors file, atomically.
    /// </summary>
    public void Save(string path)
    {
        var metadata = new Dictionary<string, string>
        {
            ["format"] = "qlora-optimizer",
            ["optimizer"] = "bnb_adamw",
            ["step"] = StepCount.ToString(CultureInfo.InvariantCulture),
            ["state_bits"] = Options.StateBits.ToString(CultureInfo.InvariantCulture),
        };
        using var writer = new SafetensorsWriter(path, metadata);
        var parts = new List<(string Key, long Offset, int Bytes)>();
        foreach (var g in _groups)
            foreach (var s in g.Slots)
                foreach (var (suffix, dtype, count, offset) in Parts(s))
                {
                    writer.Declare(s.Name + suffix, dtype, [count]);
                    parts.Add((s.Name + suffix, g.Offset + s.Offset + offset, checked((int)(count * dtype.Size()))));
                }
        var copy = _state is null ? DeviceStateCopy() : null;
        foreach (var (key, offset, bytes) in parts)
            writer.Write(key, copy is null ? _state!.Slice(offset, bytes) : copy.AsSpan(checked((int)offset), bytes));
        writer.Commit();
    }

    /// <summary>
    /// Restores state written by <see cref="Save"/> for the same parameters and state bits; a mismatch (missing
    /// parameter, other shape or state type) is an <see cref="InvalidDataException"/> naming it, and leaves this
    /// optimizer unchanged.
    /// </summary>
    public void Load(string path)
    {
        using var reader = SafetensorsReader.Open(path);
        if (!reader.Metadata.TryGetValue("optimizer", out var kind) || kind != "bnb_adamw")
            throw new InvalidDataException($"{path}: not a BnbAdamW state file");
        if (!reader.Metadata.TryGetValue("state_bits", out var bits) || bits != Options.StateBits.ToString(CultureInfo.InvariantCulture))
            throw new InvalidDataException($"{path}: state has {bits ?? "?"}-bit moments, this optimizer keeps {Options.StateBits}-bit ones");
        if (!reader.Metadata.TryGetValue("step", out var stepText) || !int.TryParse(stepText, NumberStyles.None, CultureInfo.InvariantCulture, out int step))
            throw new InvalidDataException($"{path}: no valid step count in the metadata");
        var plan = new List<(string Key, long Offset, int Bytes)>();
        foreach (var g in _groups)
            foreach (var s in g.Slots)
                foreach (var (suffix, dtype, count, offset) in Parts(s))
                {
                    var key = s.Name + suffix;
                    if (!reader.Contains(key)) throw new InvalidDataException($"{path}: no state for parameter {key}");
                    var info = reader.GetInfo(key);
                    if (info.DType != dtype || info.ElementCount != count)
                        throw new InvalidDataException($"{path}: {key} is {info.DType} x {info.ElementCount}, expected {dtype} x {count}");
                    plan.Add((key, g.Offset + s.Offset + offset, checked((int)info.ByteLength)));
                }
        if (_state is not null)
            foreach (var (key, offset, bytes) in plan) reader.GetSpan(key).CopyTo(_state.Slice(offset, bytes));
        else
        {
            // Unpaged CUDA: assemble the whole state on the host, then upload it in one copy.
            var host = DeviceStateCopy();
            foreach (var (key, offset, bytes) in plan) reader.GetSpan(key).CopyTo(host.AsSpan(checked((int)offset), bytes));
            using var upload = tensor(MemoryMarshal.Cast<byte, float>(host.AsSpan(0, host.Length & ~3)).ToArray());
            using (no_grad()) _deviceState!.narrow(0, 0, upload.shape[0]).copy_(upload);
        }
        StepCount = step;
    }

    /// <summary>A host copy of the unpaged CUDA state (the state of LoRA adapters: megabytes to a few hundred).</summary>
    private byte[] DeviceStateCopy()
    {
        using var cpu = _deviceState!.cpu();
        return cpu.bytes.ToArray();
    }

    private static IEnumerable<(string Suffix, TensorDType DType, long Count, long Offset)> Parts(Slot s)
    {
        if (!s.EightBit)
        {
            yield return (".exp_avg", TensorDType.F32, s.Count, 0);
            yield return (".exp_avg_sq", TensorDType.F32, s.Count, 4 * s.Count);
            yield break;
        }
        long abs = Align(2 * s.Count);
        yield return (".state1", TensorDType.U8, s.Count, 0);
        yield return (".state2", TensorDType.U8, s.Count, s.Count);
        yield return (".absmax1", TensorDType.F32, s.Blocks, abs);
        yield return (".absmax2", TensorDType.F32, s.Blocks, abs + 4L * s.Blocks);
    }

    private static long Align(long bytes) => (bytes + 63) & ~63L;

    /// <inheritdoc />
    public void Dispose()
    {
        _state?.Dispose();
        _scratch?.Dispose();
        _deviceState?.Dispose();
    }
}
