using QLora.Kernels;
using QLora.Quant;
using TorchSharp;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// A frozen Linear layer whose weight is stored in bitsandbytes' 4-bit format (NF4 or FP4, optionally double-quantized).
/// Forward dequantizes the weight to the compute dtype just for the matmul and discards it; backward dequantizes again
/// to produce the input gradient. No dequantized weight is kept for backward and no weight gradient is ever computed.
/// The packed parts are buffers, so they move with <c>.to(device)</c>; decoding goes through an
/// <see cref="IFourBitDequantizer"/> for the tensors' device.
/// </summary>
public sealed class Linear4bit : nn.Module<Tensor, Tensor>
{
    // The parts are registered buffers and always looked up by name: Module.to(device) replaces the registered tensors.
    private Tensor _packed => get_buffer("weight")!;
    private Tensor _absmax => get_buffer("weight_absmax")!;                   // float32 absmax, or uint8 codes when double-quantized
    private Tensor? _nestedAbsmax => _doubleQuant ? get_buffer("weight_nested_absmax") : null;   // float32
    private Tensor? _nestedMap => _doubleQuant ? get_buffer("weight_nested_quant_map") : null;   // float32[256]
    private readonly bool _doubleQuant;
    private readonly float _offset;
    private readonly int _nestedBlocksize;

    /// <summary>Wraps a quantized weight of shape [out, in] and an optional bias of shape [out].</summary>
    public Linear4bit(QuantizedTensor weight, Tensor? bias = null, ScalarType computeDType = ScalarType.BFloat16, string name = "Linear4bit")
        : this(tensor(weight.Packed, ScalarType.Byte), weight.State, bias, computeDType, name)
    {
    }

    /// <summary>
    /// Wraps packed codes already in a uint8 tensor (taken over, not copied) with their state (whose own packed bytes
    /// are not needed): how generated or device-resident weights avoid a managed copy.
    /// </summary>
    public Linear4bit(Tensor packed, QuantState state, Tensor? bias = null, ScalarType computeDType = ScalarType.BFloat16, string name = "Linear4bit")
        : this(state, computeDType, name)
    {
        var s = state;
        s.Validate();
        if (packed.dtype != ScalarType.Byte || packed.numel() != s.PackedBytes)
            throw new ArgumentException($"packed codes are {packed.dtype} x {packed.numel()}, expected Byte x {s.PackedBytes} for shape [{string.Join(", ", s.Shape)}]");
        register_buffer("weight", packed.is_contiguous() ? packed : packed.contiguous());
        if (s.Nested is { } nested)
        {
            _doubleQuant = true;
            register_buffer("weight_absmax", tensor(nested.Codes, ScalarType.Byte));
            register_buffer("weight_nested_absmax", tensor(nested.Absmax, ScalarType.Float32));
            register_buffer("weight_nested_quant_map", tensor(nested.Map, ScalarType.Float32));
            _offset = nested.Offset;
            _nestedBlocksize = nested.Blocksize;
        }
        else
        {
            register_buffer("weight_absmax", tensor(s.Absmax!, ScalarType.Float32));
        }
        _hasBias = RegisterBias(bias, computeDType);
    }

    /// <summary>
    /// A streamed weight: its packed codes and absmax are not held here but brought into device memory with their
    /// layer by <paramref name="weight"/>'s <see cref="LayerStreamer"/> whenever this layer dequantizes.
    /// </summary>
    public Linear4bit(StreamedFourBitWeight weight, Tensor? bias = null, ScalarType computeDType = ScalarType.BFloat16, string name = "Linear4bit")
        : this(weight.State, computeDType, name)
    {
        _streamed = weight;
        _doubleQuant = weight.IsDoubleQuantized;
        _offset = weight.NestedOffset;
        _nestedBlocksize = weight.NestedBlocksize;
        _hasBias = RegisterBias(bias, computeDType);
    }

    // What both kinds of weight (held or streamed) share: the 2-D shape check and the metadata of the quant state.
    private Linear4bit(QuantState s, ScalarType computeDType, string name) : base(name)
    {
        if (s.Shape.Length != 2) throw new ArgumentException($"a Linear4bit weight must be 2-D [out, in], not [{string.Join(", ", s.Shape)}]");
        OutFeatures = s.Shape[0];
        InFeatures = s.Shape[1];
        QuantType = s.QuantType;
        Blocksize = s.Blocksize;
        OriginalDType = s.DType;
        ComputeDType = computeDType;
    }

    private bool RegisterBias(Tensor? bias, ScalarType computeDType)
    {
        if (bias is null) return false;
        if (bias.numel() != OutFeatures) throw new ArgumentException($"bias has {bias.numel()} elements, expected {OutFeatures}");
        register_buffer("bias", bias.detach().to(computeDType).clone());
        return true;
    }

    private readonly StreamedFourBitWeight? _streamed;

    /// <summary>The streamed weight this layer reads, or null when its parts are held here.</summary>
    public StreamedFourBitWeight? Streamed => _streamed;

    /// <summary>Quantizes a dense [out, in] weight (any float dtype) into NF4 + double quantization (blocksize 64 by default).</summary>
    public static Linear4bit Quantize(Tensor weight, Tensor? bias = null, ScalarType computeDType = ScalarType.BFloat16,
        QuantType quantType = QuantType.Nf4, int blocksize = 64, bool doubleQuant = true)
    {
        if (weight.dim() != 2) throw new ArgumentException("weight must be 2-D [out, in]");
        return new Linear4bit(QuantizeWeight(weight, quantType, blocksize, doubleQuant), bias, computeDType);
    }

    /// <summary>The bitsandbytes 4-bit form of a dense tensor (bf16/fp16 quantized from their own bits, others via float32).</summary>
    public static QuantizedTensor QuantizeWeight(Tensor weight, QuantType quantType = QuantType.Nf4, int blocksize = 64, bool doubleQuant = true)
    {
        var source = weight.dtype is ScalarType.BFloat16 or ScalarType.Float16 ? weight : weight.to(ScalarType.Float32);
        using var cpu = source.detach().cpu().contiguous();
        return FourBitQuantizer.Quantize(cpu.bytes, TorchDTypes.ToFloatType(cpu.dtype), weight.shape, quantType, blocksize, doubleQuant);
    }

    /// <summary>Input features.</summary>
    public long InFeatures { get; }
    /// <summary>Output features.</summary>
    public long OutFeatures { get; }
    /// <summary>NF4 or FP4.</summary>
    public QuantType QuantType { get; }
    /// <summary>Elements per absmax block.</summary>
    public int Blocksize { get; }
    /// <summary>The dtype the weight had before quantization.</summary>
    public FloatType OriginalDType { get; }
    /// <summary>The dtype the weight is dequantized to and the matmul runs in.</summary>
    public ScalarType ComputeDType { get; private set; }
    /// <summary>The frozen bias, in the compute dtype, or null.</summary>
    public Tensor? Bias => _hasBias ? get_buffer("bias") : null;
    private readonly bool _hasBias;
    /// <summary>True when the absmax is double-quantized.</summary>
    public bool IsDoubleQuantized => _doubleQuant;

    /// <summary>Bytes the quantized weight occupies (packed codes and absmax, nested parts included).</summary>
    public long QuantizedBytes => _streamed?.Bytes ?? _packed.numel() + _absmax.numel() * _absmax.element_size() +
        (_nestedAbsmax?.numel() ?? 0) * 4 + (_nestedMap?.numel() ?? 0) * 4;

    /// <summary>Changes the compute dtype (bf16, fp16 or fp32).</summary>
    public void SetComputeDType(ScalarType dtype)
    {
        if (dtype is not (ScalarType.BFloat16 or ScalarType.Float16 or ScalarType.Float32))
            throw new ArgumentException($"compute dtype {dtype} is not supported: use BFloat16, Float16 or Float32");
        ComputeDType = dtype;
        if (Bias is { } old)
        {
            using var b = old.to(dtype);
            using (no_grad()) old.set_(b); // keep the registered tensor object, change its storage
        }
    }

    /// <summary>
    /// A fresh dense [out, in] weight in <paramref name="dtype"/> (the compute dtype by default) on the module's device,
    /// with bitsandbytes' rounding: decoded to the dtype the weight was quantized from (quant_state.dtype, usually bf16),
    /// then converted, as <c>dequantize_4bit(B, quant_state).to(A.dtype)</c> does. So fp32 compute sees the same weight
    /// values as bf16 compute, widened, rather than a second set that no Python run produces.
    /// </summary>
    /// <remarks>
    /// bitsandbytes ≤ 0.49 rounds this way in forward and backward; 0.50's fused gemm_4bit forward decodes straight to
    /// the compute dtype while its backward still rounds through quant_state.dtype. One rule for both passes keeps the
    /// gradient the gradient of the forward.
    /// </remarks>
    public Tensor Dequantize(ScalarType? dtype = null)
    {
        var dt = dtype ?? ComputeDType;
        var stored = TorchDTypes.ToScalarType(OriginalDType);
        if (dt == stored || OriginalDType == FloatType.Float32) return Decode(dt); // one rounding of the fp32 product either way
        using var w = Decode(stored);
        return w.to(dt);
    }

    // Decodes the codes straight into a new tensor of dtype dt.
    private Tensor Decode(ScalarType dt)
    {
        var floatType = TorchDTypes.ToFloatType(dt);
        if (_streamed is not null)
        {
            // Streamed: the layer's resident copy (brought in now if the schedule did not prefetch it).
            var streamedOutput = empty([OutFeatures, InFeatures], dtype: dt, device: _streamed.Layer.Streamer.Device);
            DequantizerFor(streamedOutput.device).Dequantize(_streamed.Layer.Streamer.Pointers(_streamed), floatType, TensorMemory.DataPointer(streamedOutput));
            return streamedOutput;
        }
        var output = empty([OutFeatures, InFeatures], dtype: dt, device: _packed.device);
        var source = new FourBitPointers
        {
            Packed = TensorMemory.DataPointer(_packed),
            Count = OutFeatures * InFeatures,
            Blocksize = Blocksize,
            QuantType = QuantType,
            Absmax = IsDoubleQuantized ? 0 : TensorMemory.DataPointer(_absmax),
            AbsmaxCodes = IsDoubleQuantized ? TensorMemory.DataPointer(_absmax) : 0,
            NestedAbsmax = _nestedAbsmax is null ? 0 : TensorMemory.DataPointer(_nestedAbsmax),
            NestedMap = _nestedMap is null ? 0 : TensorMemory.DataPointer(_nestedMap),
            Offset = _offset,
            NestedBlocksize = _nestedBlocksize,
        };
        DequantizerFor(_packed.device).Dequantize(source, floatType, TensorMemory.DataPointer(output));
        return output;
    }

    /// <summary>y = x · Wᵀ + b with W dequantized on the fly (and again in backward).</summary>
    public override Tensor forward(Tensor input)
    {
        var y = ProjectWithoutBias(input);
        if (Bias is not null) y = y.add_(Bias);
        return y;
    }

    /// <summary>
    /// x · Wᵀ without the bias, through the same autograd node as <see cref="forward"/> (nothing saved, W dequantized
    /// again in backward): what DoRA's dropout path needs, PEFT's <c>F.linear(x, W)</c> of the dropped input.
    /// </summary>
    public Tensor ProjectWithoutBias(Tensor input)
    {
        if (input.shape[^1] != InFeatures)
            throw new ArgumentException($"input's last dimension is {input.shape[^1]}, this layer takes {InFeatures}");
        if (_streamed is not null && input.device_type != _streamed.Layer.Streamer.Device.type)
            throw new ArgumentException($"input on {input.device}, the streamed layer's weights on {_streamed.Layer.Streamer.Device}");
        var x = input.dtype == ComputeDType ? input : input.to(ComputeDType);
        return Linear4bitFunction.apply(x, this);
    }

    /// <summary>The dequantizer for a device: the CPU one, or the CUDA kernels in libtorch's primary context.</summary>
    internal static IFourBitDequantizer DequantizerFor(Device device) =>
        FourBitDequantizers.Create(device.type == DeviceType.CPU ? DeviceKind.Cpu : DeviceKind.Cuda, Math.Max(0, device.index));

    /// <summary>The custom autograd node: saves nothing but the module; backward dequantizes again.</summary>
    private sealed class Linear4bitFunction : torch.autograd.SingleTensorFunction<Linear4bitFunction>
    {
        public override string Name => "Linear4bitBackward";

        public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
        {
            var x = (Tensor)vars[0];
            var layer = (Linear4bit)vars[1];
            // TorchSharp would materialise missing grads from a cached empty_like of the output, which a caller's
            // dispose scope may already have freed; take "no gradient" as it is instead.
            ctx.set_materialize_grads(false);
            ctx.save_data("layer", layer);
            ctx.save_data("thread", Environment.CurrentManagedThreadId);
            using var w = layer.Dequantize();
            return nn.functional.linear(x, w);
        }

        public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor grad)
        {
            ReturnedGradients.Release(); // e.g. attention by group's q, k, v gradients: RoPE's backward has consumed them
            if (grad.IsInvalid) return [null!, null!];
            try
            {
                var layer = (Linear4bit)ctx.get_data("layer");
                using var w = layer.Dequantize();
                var g = grad.dtype == w.dtype ? grad : grad.to(w.dtype);
                return [g.matmul(w), null!];
            }
            catch (Exception e)
            {
                // An exception must not cross the native callback (it would abort the process, e.g. a failed kernel
                // launch on CUDA): Checkpoint.Backward rethrows it once backward returns.
                Checkpoint.RecordFailure(e, ctx.get_data("thread") as int?);
                return [null!, null!];
            }
        }
    }
}
