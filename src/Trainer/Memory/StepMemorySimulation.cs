using QLora.Kernels;
using static TorchSharp.torch;

namespace QLora.Trainer;

/// <summary>
/// Replays the tensor allocations of one training step of this project's modules, in the order the code makes them, and
/// keeps the largest total with its make-up. It mirrors the code, not a textbook: TorchSharp frees a tensor when its
/// dispose scope ends (so every intermediate of <c>LlamaAttention.Forward</c> lives until it returns), autograd keeps
/// what each op saves for backward (RmsNorm's float32 input and rsqrt, the LoRA A input and A output, SDPA's q/k/v,
/// output and log-sum-exp, SwiGLU's gate, silu and up outputs), <c>Linear4bit</c> saves nothing and dequantizes one
/// weight at a time, <see cref="Checkpoint"/> keeps only each layer's input, and the loss works in chunks of
/// <see cref="PlanOptions.LossChunkTokens"/> tokens. Flash-style SDPA (no score matrix) is assumed without an attention
/// mask, the math path (B·heads·T² scores) with one.
/// </summary>
internal sealed class StepMemorySimulation
{
    // Component names (the keys of MemoryPlan.Components).
    public const string QuantizedWeights = "quantized_weights";
    public const string StreamingWindow = "streaming_window";
    public const string UnquantizedWeights = "unquantized_weights";
    public const string LoraWeights = "lora_weights";
    public const string LoraGradients = "lora_gradients";
    public const string OptimizerState = "optimizer_state";
    public const string FrameworkOverhead = "framework_overhead";
    public const string SavedActivations = "saved_activations";
    public const string LayerWorkingSet = "layer_working_set";
    public const string AttentionBuffers = "attention_buffers";
    public const string LossBuffers = "loss_buffers";
    public const string DequantBuffers = "dequant_buffers";

    public static readonly string[] Order =
    [
        QuantizedWeights, StreamingWindow, UnquantizedWeights, LoraWeights, LoraGradients, OptimizerState, SavedActivations,
        LayerWorkingSet, AttentionBuffers, LossBuffers, DequantBuffers, FrameworkOverhead,
    ];

    private sealed class Buf(string category, long bytes)
    {
        public string Category = category;
        public readonly long Bytes = bytes;
        public bool Live = true;
        public bool Saved;
        public bool Pinned;
    }

    private sealed class Scope : List<Buf>;

    /// <summary>What one decoder layer saved for backward, by the part that releases it.</summary>
    private sealed class LayerSaved
    {
        public readonly List<Buf> Norm1 = [], Attention = [], Norm2 = [], Mlp = [];
    }

    private readonly Dictionary<string, long> _current = new(StringComparer.Ordinal);
    private long _total;
    private string _phase = "setup";

    private readonly LlamaConfig _cfg;
    private readonly PlanOptions _o;
    private long _n;                     // tokens per micro-batch (of one MLP tile while a tile is simulated)
    private readonly int _c;             // compute dtype bytes
    private readonly int _m;             // adapter master dtype bytes
    private readonly long _h, _i, _q, _kv, _r;
    private readonly HashSet<string> _targets;

    private StepMemorySimulation(LlamaConfig cfg, PlanOptions o)
    {
        _cfg = cfg;
        // Gemma 2's soft-capped scores are computed explicitly (the B·heads·T² path), as a masked attention is.
        _o = cfg.Gemma?.AttnLogitSoftcapping is not null ? o with { AttentionMask = true } : o;
        _n = (long)o.MicroBatch * o.SequenceLength;
        _c = DTypeBytes(o.ComputeDType);
        _m = DTypeBytes(o.AdapterDType);
        _h = cfg.HiddenSize;
        _i = cfg.IntermediateSize;
        _q = (long)cfg.NumAttentionHeads * cfg.HeadDim;
        _kv = (long)cfg.NumKeyValueHeads * cfg.HeadDim;
        _r = o.LoraRank;
        _targets = new HashSet<string>(o.LoraTargets, StringComparer.Ordinal);
    }

    /// <summary>The largest total seen.</summary>
    public long PeakBytes { get; private set; } = -1;
    /// <summary>The make-up of the total at the peak.</summary>
    public IReadOnlyDictionary<string, long> AtPeak { get; private set; } = new Dictionary<string, long>();
    /// <summary>The phase of the step at the peak.</summary>
    public string PeakPhase { get; private set; } = "";

    /// <summary>Bytes per element of a dtype the planner supports.</summary>
    public static int DTypeBytes(ScalarType t) => t switch
    {
        ScalarType.Float32 => 4,
        ScalarType.BFloat16 or ScalarType.Float16 => 2,
        _ => throw new ArgumentException($"dtype {t} is not supported here"),
    };

    /// <summary>Runs the step given the persistent components (bytes by name) and the bytes the optimizer's update adds.</summary>
    public static StepMemorySimulation Run(LlamaConfig cfg, PlanOptions o, IEnumerable<(string Name, long Bytes)> persistent, long optimizerUpdateBytes)
    {
        var s = new StepMemorySimulation(cfg, o);
        foreach (var (name, bytes) in persistent) s.Alloc(name, bytes);
        s.Step(optimizerUpdateBytes);
        return s;
    }

    private Buf Alloc(string category, long bytes)
    {
        var b = new Buf(category, bytes);
        _current[category] = _current.GetValueOrDefault(category) + bytes;
        _total += bytes;
        if (_total > PeakBytes)
        {
            PeakBytes = _total;
            AtPeak = new Dictionary<string, long>(_current);
            PeakPhase = _phase;
        }
        return b;
    }

    private Buf A(Scope s, string category, long bytes)
    {
        var b = Alloc(category, bytes);
        s.Add(b);
        return b;
    }

    private void Free(Buf? b)
    {
        if (b is null || !b.Live || b.Pinned) return;
        b.Live = false;
        _current[b.Category] -= b.Bytes;
        _total -= b.Bytes;
    }

    /// <summary>The code disposes its handle on <paramref name="b"/>: freed now unless autograd saved it.</summary>
    private void Drop(Buf? b)
    {
        if (b is not null && !b.Saved) Free(b);
    }

    /// <summary>Autograd keeps <paramref name="b"/> for backward: it outlives its scope, and is counted as a saved activation.</summary>
    private void Save(Buf b, List<Buf>? into, string category = SavedActivations)
    {
        if (into is null || b.Saved) return;
        b.Saved = true;
        if (b.Category != category && b.Live)
        {
            _current[b.Category] -= b.Bytes;
            _current[category] = _current.GetValueOrDefault(category) + b.Bytes;
        }
        b.Category = category;
        into.Add(b);
    }

    /// <summary>Ends a dispose scope: frees what is neither saved nor returned; the returned buffers join <paramref name="outer"/>.</summary>
    private void End(Scope s, Scope? outer, params Buf[] keep)
    {
        foreach (var b in s)
        {
            if (keep.Contains(b)) { outer?.Add(b); continue; }
            if (!b.Saved) Free(b);
        }
        s.Clear();
    }

    /// <summary>
    /// A custom autograd function's backward (Linear4bit, Checkpoint) receives its output gradient and returns its input
    /// gradient as TorchSharp handles, which are registered in the dispose scope open at that moment and hold the
    /// storage until that scope ends (inside a checkpoint: the recompute's scope; otherwise the caller's scope around
    /// the backward call), even after autograd is done with them.
    /// </summary>
    private void Pin(Buf b, List<Buf> into)
    {
        if (b.Pinned) return;
        b.Pinned = true;
        into.Add(b);
    }

    private void Unpin(List<Buf> pinned)
    {
        foreach (var b in pinned) { b.Pinned = false; Free(b); }
        pinned.Clear();
    }

    private void Release(List<Buf> saved)
    {
        foreach (var b in saved) Free(b);
        saved.Clear();
    }

    private bool Lora(string proj) => _targets.Contains(proj);

    private void Step(long optimizerUpdateBytes)
    {
        int layers = _cfg.NumHiddenLayers;
        bool ckpt = _o.GradientCheckpointing;
        bool offload = ckpt && _o.OffloadCheckpoints;
        long hd = _cfg.HeadDim;

        // ---- forward (LlamaForCausalLM.Forward: one dispose scope) ----
        _phase = "forward";
        var fwd = new Scope();
        var keepAlive = new List<Buf>();
        var cos = A(fwd, LayerWorkingSet, _n * hd * _c);
        var sin = A(fwd, LayerWorkingSet, _n * hd * _c);
        Save(cos, keepAlive);   // checkpoint constants / RoPE's saved multipliers
        Save(sin, keepAlive);
        var h = A(fwd, LayerWorkingSet, _n * _h * _c); // embedding rows
        var inputs = new List<Buf>();
        var layerSaved = new List<LayerSaved>();
        Buf? storing = null; // CUDA: the stored input whose asynchronous copy to the host may still run
        for (int l = 0; l < layers; l++)
        {
            _phase = $"forward: layer {l}";
            if (offload)
            {
                var next = LayerForward(fwd, h, grad: false, null);
                if (storing is not null) Free(storing); // the next store releases the one before it
                if (_o.Device == DeviceKind.Cuda) storing = h; // kept until its copy has run (CudaActivationCopies)
                else Free(h);      // copied to the host by the checkpoint, freed by the caller
                h = next;
            }
            else if (ckpt)
            {
                Save(h, inputs);   // the checkpoint keeps its input
                h = LayerForward(fwd, h, grad: false, null);
            }
            else
            {
                var ls = new LayerSaved();
                layerSaved.Add(ls);
                h = LayerForward(fwd, h, grad: true, ls);
            }
        }
        if (storing is not null) Free(storing); // ActivationOffload.FinishStores
        _phase = "forward: final norm";
        var finalSaved = new List<Buf>();
        var hidden = Norm(fwd, h, grad: true, finalSaved);
        End(fwd, null, hidden);

        // ---- loss (CausalLmLoss.Compute: chunks checkpointed) ----
        _phase = "loss forward";
        long b = _o.MicroBatch, t = _o.SequenceLength, v = _cfg.VocabSize;
        long targets = b * (t - 1);
        var loss = new Scope();
        if (b > 1) A(loss, LossBuffers, targets * _h * _c);          // reshape of the narrowed rows copies
        A(loss, LossBuffers, targets * 8 * 2);                        // targets, kept indices (int64)
        var selected = A(loss, LossBuffers, targets * _h * _c);      // index_select copy
        var selectedTargets = A(loss, LossBuffers, targets * 8);
        var lossSaved = new List<Buf>();
        Save(selected, lossSaved, LossBuffers);
        Save(selectedTargets, lossSaved, LossBuffers);
        long chunk = Math.Min(_o.LossChunkTokens, targets);
        var chunkScope = new Scope();
        A(chunkScope, LossBuffers, chunk * v * _c);                   // logits in the compute dtype
        if (_c != 4) A(chunkScope, LossBuffers, chunk * v * 4);       // upcast
        A(chunkScope, LossBuffers, chunk * v * 4);                    // log_softmax inside cross_entropy
        End(chunkScope, null);
        Free(hidden);
        End(loss, null);

        // ---- backward: loss chunks (each recomputed), last one first ----
        _phase = "backward: loss chunk";
        var stepPins = new List<Buf>();   // handles the caller's scope around backward holds until the step ends
        Buf? gSelected = null;
        long chunks = (targets + chunk - 1) / chunk;
        Buf? returned = null;              // the checkpoint's returned input gradient: dropped when the next checkpoint's backward starts
        for (long k = 0; k < chunks; k++)
        {
            Free(returned);
            var logits = Alloc(LossBuffers, chunk * v * _c);
            var up = _c != 4 ? Alloc(LossBuffers, chunk * v * 4) : null;
            var lsm = Alloc(LossBuffers, chunk * v * 4);               // saved by log_softmax
            Free(logits);
            Free(up);
            var gLsm = Alloc(LossBuffers, chunk * v * 4);              // nll_loss backward
            var gLogits32 = Alloc(LossBuffers, chunk * v * 4);         // log_softmax backward
            Free(gLsm);
            Free(lsm);
            var gLogits = _c != 4 ? Alloc(LossBuffers, chunk * v * _c) : null;
            var gx = Alloc(LossBuffers, chunk * _h * _c);              // lm_head input gradient
            Free(gLogits32);
            Free(gLogits);
            returned = gx;
            var gNarrow = Alloc(LossBuffers, targets * _h * _c);       // narrow backward: zeros + slice
            if (gSelected is null) gSelected = gNarrow;
            else Free(gNarrow);                                      // accumulated in place
        }
        Release(lossSaved);
        _phase = "backward: final norm";
        var gStates = Alloc(LossBuffers, targets * _h * _c);          // index_select backward
        Free(gSelected);
        var gHidden = Alloc(LayerWorkingSet, _n * _h * _c);           // narrow backward
        Free(gStates);
        var g = NormBackward(gHidden);
        Free(gHidden);
        Release(finalSaved);

        // ---- backward: decoder layers, last first ----
        Buf? prefetched = null;
        for (int l = layers - 1; l >= 0; l--)
        {
            LayerSaved ls;
            Buf? output = null, input = null;
            Free(returned);
            returned = null;
            if (ckpt)
            {
                _phase = $"backward: recompute of layer {l}";
                if (offload)
                {
                    // fetched back from the host; fetching it starts bringing back the previous layer's input
                    input = prefetched ?? Alloc(SavedActivations, _n * _h * _c);
                    prefetched = l > 0 ? Alloc(SavedActivations, _n * _h * _c) : null;
                }
                else input = inputs[l];
                ls = new LayerSaved();
                var recompute = new Scope();
                output = LayerForward(recompute, input, grad: true, ls);
                End(recompute, null, output);
            }
            else ls = layerSaved[l];
            _phase = $"backward: layer {l}";
            var layerPins = ckpt ? new List<Buf>() : stepPins;
            var gIn = LayerBackward(g, ls, layerPins);
            if (ckpt) Unpin(layerPins);        // the recompute's scope ends (the checkpoint drops its gradient handles: see Checkpoint)
            Free(output);
            Free(g);
            if (ckpt) Free(input);
            g = gIn;
        }
        Free(g);
        Release(keepAlive);
        if (!ckpt) Free(h);
        _phase = "backward: end";
        Unpin(stepPins);

        // ---- optimizer ----
        _phase = "optimizer step";
        Free(Alloc(LayerWorkingSet, optimizerUpdateBytes));
    }

    private bool NormTiled => _o.NormTileTokens > 0 && _n > _o.NormTileTokens;

    /// <summary>RmsNorm.forward: float32 copy, square, mean, rsqrt, product, cast back, scale. Saves x32 and rsqrt.</summary>
    private Buf Norm(Scope outer, Buf input, bool grad, List<Buf>? saved)
    {
        if (NormTiled) return TiledNorm(outer, input, grad, saved);
        var s = new Scope();
        var x32 = _c != 4 ? A(s, LayerWorkingSet, _n * _h * 4) : null;
        var square = A(s, LayerWorkingSet, _n * _h * 4);    // pow
        A(s, LayerWorkingSet, _n * 4);                      // mean
        Drop(square);
        A(s, LayerWorkingSet, _n * 4);                      // + eps
        var rs = A(s, LayerWorkingSet, _n * 4);             // rsqrt
        var product = A(s, LayerWorkingSet, _n * _h * 4);   // x32 · rsqrt
        if (_c != 4)
        {
            A(s, LayerWorkingSet, _n * _h * _c);             // cast back
            Drop(product);
        }
        if (grad)
        {
            if (x32 is not null) Save(x32, saved);
            Save(rs, saved);
        }
        Drop(x32);
        var o = A(s, LayerWorkingSet, _n * _h * _c);         // weight · normed
        End(s, outer, o);
        return o;
    }

    /// <summary>
    /// The token-tiled RmsNorm (<see cref="RmsNorm.TileTokens"/>): one output and a float32 scale per token, then per
    /// tile (its temporaries live until the tile ends) the float32 copy, square, mean, scale, product, cast and weight
    /// product. Saves the input itself and the scales.
    /// </summary>
    private Buf TiledNorm(Scope outer, Buf input, bool grad, List<Buf>? saved)
    {
        var s = new Scope();
        var o = A(s, LayerWorkingSet, _n * _h * _c);
        var scales = grad ? A(s, LayerWorkingSet, _n * 4) : null;
        for (long start = 0; start < _n; start += _o.NormTileTokens)
        {
            long t = Math.Min(_o.NormTileTokens, _n - start);
            var tile = new Scope();
            if (_c != 4) A(tile, LayerWorkingSet, t * _h * 4);   // float32 copy
            A(tile, LayerWorkingSet, t * _h * 4);                // square
            A(tile, LayerWorkingSet, t * 4 * 3);                 // mean, + eps, rsqrt
            A(tile, LayerWorkingSet, t * _h * 4);                // product
            if (_c != 4) A(tile, LayerWorkingSet, t * _h * _c);  // cast back
            A(tile, LayerWorkingSet, t * _h * _c);               // weight · normed, then copied into the output
            End(tile, null);
        }
        if (grad)
        {
            Save(input, saved);
            Save(scales!, saved);
        }
        End(s, outer, o);
        return o;
    }

    /// <summary>Backward of the tiled RmsNorm: one input gradient, and per tile g·w, its float32 widening, the float32 input, g·x, r·g, x·r³·mean(g·x) and the difference.</summary>
    private Buf TiledNormBackward()
    {
        var result = Alloc(LayerWorkingSet, _n * _h * _c);
        for (long start = 0; start < _n; start += _o.NormTileTokens)
        {
            long t = Math.Min(_o.NormTileTokens, _n - start);
            var tile = new List<Buf> { Alloc(LayerWorkingSet, t * _h * _c) };       // g · w
            if (_c != 4) tile.Add(Alloc(LayerWorkingSet, t * _h * 4));             // widened
            if (_c != 4) tile.Add(Alloc(LayerWorkingSet, t * _h * 4));             // x in float32
            tile.Add(Alloc(LayerWorkingSet, t * _h * 4));                          // g · x
            tile.Add(Alloc(LayerWorkingSet, t * 4 * 3));                           // mean, r³, r³ · mean
            tile.Add(Alloc(LayerWorkingSet, t * _h * 4));                          // r · g
            tile.Add(Alloc(LayerWorkingSet, t * _h * 4));                          // x · r³ · mean
            tile.Add(Alloc(LayerWorkingSet, t * _h * 4));                          // the difference, copied into the result
            foreach (var b in tile) Free(b);
        }
        return result;
    }

    /// <summary>RmsNorm backward: the weight product, the float32 chain (about three float32 temporaries) and the cast back.</summary>
    private Buf NormBackward(Buf g)
    {
        if (NormTiled) return TiledNormBackward();
        var t = new[]
        {
            Alloc(LayerWorkingSet, _n * _h * _c), Alloc(LayerWorkingSet, _n * _h * 4),
            Alloc(LayerWorkingSet, _n * _h * 4), Alloc(LayerWorkingSet, _n * _h * 4), Alloc(LayerWorkingSet, _n * _h * 4),
        };
        var result = Alloc(LayerWorkingSet, _n * _h * _c);
        foreach (var x in t) Free(x);
        return result;
    }

    /// <summary>LoraLinear over Linear4bit: dequantized tile + matmul, then the LoRA branch in the compute dtype.</summary>
    private Buf Proj(Scope s, Buf x, long inF, long outF, string name, bool grad, List<Buf>? saved)
    {
        var dq = _o.QuantizeBase ? Alloc(DequantBuffers, outF * inF * _c) : null;
        var y = A(s, LayerWorkingSet, _n * outF * _c);
        Free(dq);
        if (!Lora(name)) return y;
        if (_o.UseDora) return DoraProj(s, x, y, inF, outF, grad, saved);
        // LoRA dropout (training): CPU ATen draws a noise tensor of the input's dtype and multiplies (mul saves the
        // noise), CUDA's fused kernel a bool mask (saved); the A matmul then saves the dropped copy instead of x.
        Buf? noise = null, dropped = null;
        if (_o.LoraDropout > 0)
        {
            noise = A(s, LayerWorkingSet, _n * inF * (_o.Device == DeviceKind.Cuda ? 1 : _c));
            dropped = A(s, LayerWorkingSet, _n * inF * _c);
            if (!grad) Drop(noise);
        }
        Buf? wa = _m != _c ? A(s, LayerWorkingSet, _r * inF * _c) : null;
        var aOut = A(s, LayerWorkingSet, _n * _r * _c);
        Buf? wb = _m != _c ? A(s, LayerWorkingSet, outF * _r * _c) : null;
        var up = A(s, LayerWorkingSet, _n * outF * _c);      // B(A(x))
        var scaled = A(s, LayerWorkingSet, _n * outF * _c);  // · scaling
        if (grad)
        {
            Save(dropped ?? x, saved);
            if (noise is not null) Save(noise, saved);
            Save(aOut, saved);
            if (wa is not null) Save(wa, saved);
            if (wb is not null) Save(wb, saved);
        }
        var sum = A(s, LayerWorkingSet, _n * outF * _c);     // base + update
        // LoraLinear drops each handle once the next op has the tensor
        Drop(scaled); Drop(up); Drop(aOut); Drop(wa); Drop(wb); Drop(y); Drop(dropped); Drop(noise);
        return sum;
    }

    /// <summary>
    /// LoraLinear's DoRA forward (its intermediates live until it returns): the LoRA branch, the weight norm (the base
    /// weight dequantized once more in its stored dtype, taken as the compute dtype here, and two float32 row chunks of
    /// W and B·A, <see cref="DoraWeightNorm"/>), the rescaled base and adapter terms, their sum. Autograd saves the base
    /// output and B(A(x)) (each multiplies a factor that depends on the magnitude) besides the LoRA inputs. The planner
    /// assumes no dropout (with dropout the base matmul runs again on the dropped input, whose copy is saved too).
    /// </summary>
    private Buf DoraProj(Scope s, Buf x, Buf y, long inF, long outF, bool grad, List<Buf>? saved)
    {
        var d = new Scope();
        Buf? wa = _m != _c ? A(d, LayerWorkingSet, _r * inF * _c) : null;
        var aOut = A(d, LayerWorkingSet, _n * _r * _c);
        Buf? wb = _m != _c ? A(d, LayerWorkingSet, outF * _r * _c) : null;
        var up = A(d, LayerWorkingSet, _n * outF * _c);                // B(A(x))
        var w = _o.QuantizeBase ? Alloc(DequantBuffers, outF * inF * _c) : null; // the weight dequantized for its norm (a dense base is read as it is)
        long chunk = DoraWeightNorm.ChunkRows(outF, inF) * inF * 4;
        var c1 = Alloc(DequantBuffers, chunk);                           // float32 rows of W
        var c2 = Alloc(DequantBuffers, chunk);                           // float32 rows of B·A, then W + scaling·B·A
        Free(c2); Free(c1); Free(w);
        var baseTerm = A(d, LayerWorkingSet, _n * outF * _c);          // (base(x) − bias)·(s − 1)
        var loraTerm = A(d, LayerWorkingSet, _n * outF * _c);          // B(A(x))·s·scaling
        var dora = A(d, LayerWorkingSet, _n * outF * _c);
        if (grad)
        {
            Save(x, saved);
            Save(aOut, saved);
            Save(up, saved);
            Save(y, saved);
            if (wa is not null) Save(wa, saved);
            if (wb is not null) Save(wb, saved);
        }
        var sum = A(d, LayerWorkingSet, _n * outF * _c);               // base + DoRA term
        Drop(baseTerm); Drop(loraTerm); Drop(dora);
        End(d, s, sum);
        Drop(y);
        return sum;
    }

    /// <summary>Input gradient of a projection: LoRA branch (scaled gradient, A-output and weight gradients), then the base's dequantized tile.</summary>
    private Buf ProjBackward(Buf gy, long inF, long outF, string name, List<Buf> pins)
    {
        Pin(gy, pins);
        Buf? gxLora = null;
        Buf? gBase = null;
        if (Lora(name) && _o.UseDora)
        {
            // DoRA: gy·(s − 1) into the base output, gy·s·scaling into B(A(x)) (the LoRA branch's gradient below), and
            // the products with the saved base output and B(A(x)) reduced into the magnitude's gradient.
            gBase = Alloc(LayerWorkingSet, _n * outF * _c);
            Free(Alloc(LayerWorkingSet, _n * outF * _c));
        }
        if (Lora(name))
        {
            var gs = Alloc(LayerWorkingSet, _n * outF * _c);
            var gA = Alloc(LayerWorkingSet, _n * _r * _c);
            var gWb = Alloc(LayerWorkingSet, outF * _r * _c);
            var gWb32 = _m != _c ? Alloc(LayerWorkingSet, outF * _r * _m) : null;
            Free(gWb); Free(gWb32); Free(gs);
            gxLora = Alloc(LayerWorkingSet, _n * inF * _c);
            var gWa = Alloc(LayerWorkingSet, _r * inF * _c);
            var gWa32 = _m != _c ? Alloc(LayerWorkingSet, _r * inF * _m) : null;
            Free(gWa); Free(gWa32); Free(gA);
            if (_o.LoraDropout > 0)
            {
                var gDropped = Alloc(LayerWorkingSet, _n * inF * _c);   // through the dropout: gradient · noise (or mask)
                Free(gxLora);
                gxLora = gDropped;
            }
        }
        // DoRA: the base output's two gradients (gy and gy·(s − 1)) are summed before the base layer's backward.
        var gSum = gBase is not null ? Alloc(LayerWorkingSet, _n * outF * _c) : null;
        Free(gBase);
        var dq = _o.QuantizeBase ? Alloc(DequantBuffers, outF * inF * _c) : null;
        var gx = Alloc(LayerWorkingSet, _n * inF * _c);
        Free(dq);
        Free(gSum);
        Pin(gx, pins);
        // Autograd runs the LoRA branch first (its nodes are newer) and adds the base gradient into that buffer in place.
        return gxLora ?? gx;
    }

    private Buf Rope(Scope outer, long width)
    {
        var s = new Scope();
        A(s, LayerWorkingSet, _n * width / 2 * _c);  // −x2
        A(s, LayerWorkingSet, _n * width * _c);      // cat
        A(s, LayerWorkingSet, _n * width * _c);      // x·cos
        A(s, LayerWorkingSet, _n * width * _c);      // rotated·sin
        var o = A(s, LayerWorkingSet, _n * width * _c);
        End(s, outer, o);
        return o;
    }

    private Buf RopeBackward(long width)
    {
        var t = new[] { Alloc(LayerWorkingSet, _n * width * _c), Alloc(LayerWorkingSet, _n * width * _c), Alloc(LayerWorkingSet, _n * width * _c) };
        var result = Alloc(LayerWorkingSet, _n * width * _c);
        foreach (var x in t) Free(x);
        return result;
    }

    private long ScoreBytes => (long)_o.MicroBatch * _cfg.NumAttentionHeads * _o.SequenceLength * (long)_o.SequenceLength * _c;

    /// <summary>LlamaDecoderLayer.Forward; returns the output, left in <paramref name="outer"/>.</summary>
    private Buf LayerForward(Scope outer, Buf input, bool grad, LayerSaved? ls)
    {
        var d = new Scope();
        var n1 = Norm(d, input, grad, ls?.Norm1);
        var attention = Attention(d, n1, grad, ls?.Attention);
        var h = A(d, LayerWorkingSet, _n * _h * _c);         // h = x + attn
        Drop(attention); Drop(n1);
        var n2 = Norm(d, h, grad, ls?.Norm2);
        var mlp = Mlp(d, n2, grad, ls?.Mlp);
        var o = A(d, LayerWorkingSet, _n * _h * _c);         // h + mlp
        Drop(mlp); Drop(n2); Drop(h);
        End(d, outer, o);
        return o;
    }

    private Buf Attention(Scope outer, Buf n1, bool grad, List<Buf>? saved)
    {
        var s = new Scope();
        var qOut = Proj(s, n1, _h, _q, "q_proj", grad, saved);
        var kOut = Proj(s, n1, _h, _kv, "k_proj", grad, saved);
        var vOut = Proj(s, n1, _h, _kv, "v_proj", grad, saved);
        var qr = Rope(s, _q);
        Drop(qOut);
        var kr = Rope(s, _kv);
        Drop(kOut);
        Buf kx = kr, vx = vOut;
        if (ByGroup) return AttentionByGroup(s, outer, qr, kr, vOut, grad, saved);
        if (_kv != _q)
        {
            kx = A(s, AttentionBuffers, _n * _q * _c);   // repeat_interleave of K and V heads
            Drop(kr);
            vx = A(s, AttentionBuffers, _n * _q * _c);
            Drop(vOut);
        }
        Buf o;
        if (_o.AttentionMask)
        {
            // math SDPA: scaled q, scores, masked scores, softmax (saved), output
            var qs = A(s, AttentionBuffers, _n * _q * _c);
            var scores = Alloc(AttentionBuffers, ScoreBytes);
            var masked = Alloc(AttentionBuffers, ScoreBytes);
            var sm = A(s, AttentionBuffers, ScoreBytes);
            Free(scores);
            Free(masked);
            o = A(s, LayerWorkingSet, _n * _q * _c);
            if (grad) { Save(qs, saved, AttentionBuffers); Save(sm, saved, AttentionBuffers); }
            Drop(qs); Drop(sm);
        }
        else
        {
            var parts = _o.SegmentAttention ? Alloc(LayerWorkingSet, _n * _q * _c) : null; // each segment's output, then one cat
            o = A(s, LayerWorkingSet, _n * _q * _c);
            Free(parts);
            var lse = A(s, AttentionBuffers, _n * _cfg.NumAttentionHeads * 4L);
            if (grad) Save(lse, saved, AttentionBuffers);
        }
        if (grad)
        {
            Save(qr, saved);
            Save(kx, saved, kx == kr ? SavedActivations : AttentionBuffers);
            Save(vx, saved, vx == vOut ? SavedActivations : AttentionBuffers);
            Save(o, saved);
        }
        return MergeAndProject(s, outer, grad, saved, o, qr, kx, vx);
    }

    /// <summary>The heads back in token order (a copy), the inputs' handles dropped, then o_proj; ends the attention's scope.</summary>
    private Buf MergeAndProject(Scope s, Scope outer, bool grad, List<Buf>? saved, Buf o, params Buf[] dropped)
    {
        var merged = A(s, LayerWorkingSet, _n * _q * _c);
        Drop(o);
        foreach (var b in dropped) Drop(b);
        var result = Proj(s, merged, _q, _h, "o_proj", grad, saved);
        Drop(merged);
        End(s, outer, result);
        return result;
    }

    /// <summary>GroupedQueryAttention applies: GQA, causal, no mask and no segments (what LlamaAttention checks).</summary>
    private bool ByGroup => _o.AttentionByGroup && _kv != _q && !_o.AttentionMask && !_o.SegmentAttention;

    /// <summary>
    /// GroupedQueryAttention: one output, each group's SDPA output and log-sum-exp freed with the group; saves q, k and v
    /// at their own widths (not the output), then the merge and o_proj as in <see cref="Attention"/>.
    /// </summary>
    private Buf AttentionByGroup(Scope s, Scope outer, Buf qr, Buf kr, Buf vOut, bool grad, List<Buf>? saved)
    {
        var o = A(s, LayerWorkingSet, _n * _q * _c);
        AttentionGroups(backward: false);
        if (grad)
        {
            Save(qr, saved);
            Save(kr, saved);
            Save(vOut, saved);
        }
        return MergeAndProject(s, outer, grad, saved, o, qr, kr, vOut);
    }

    /// <summary>Per K/V group: SDPA's output and log-sum-exp; in backward (the group recomputed) also its q gradient and the expanded K and V gradients, summed to one head each.</summary>
    private void AttentionGroups(bool backward)
    {
        long groups = _cfg.NumKeyValueHeads, heads = _cfg.NumAttentionHeads / groups, width = heads * _cfg.HeadDim;
        for (long g = 0; g < groups; g++)
        {
            var t = new List<Buf> { Alloc(LayerWorkingSet, _n * width * _c), Alloc(AttentionBuffers, _n * heads * 4) };
            if (backward)
            {
                t.Add(Alloc(LayerWorkingSet, _n * width * _c));            // q gradient
                t.Add(Alloc(LayerWorkingSet, _n * width * _c));            // expanded K gradient
                t.Add(Alloc(LayerWorkingSet, _n * width * _c));            // expanded V gradient
                t.Add(Alloc(LayerWorkingSet, _n * _cfg.HeadDim * _c));     // summed to one head
                t.Add(Alloc(LayerWorkingSet, _n * _cfg.HeadDim * _c));
            }
            foreach (var b in t) Free(b);
        }
    }

    private bool MlpTiled => _o.MlpTileTokens > 0 && _n > _o.MlpTileTokens;

    /// <summary>
    /// The sequence-tiled MLP (<see cref="LlamaMlp.TileTokens"/>): each tile runs without grad (checkpointed on its own,
    /// keeping only a view of the input, which so stays saved), its output joins the others in one [tokens, hidden] cat.
    /// </summary>
    private Buf MlpTiles(Scope outer, Buf n2, bool grad, List<Buf>? saved)
    {
        if (grad) Save(n2, saved);
        long n = _n, tile = _o.MlpTileTokens;
        var parts = new List<Buf>();
        for (long start = 0; start < n; start += tile)
        {
            _n = Math.Min(tile, n - start);
            var s = new Scope();
            var view = new Buf(LayerWorkingSet, 0);
            parts.Add(MlpUntiled(s, view, grad: false, null));
            End(s, null, parts[^1]);
            _n = n;
        }
        var joined = Alloc(LayerWorkingSet, n * _h * _c);
        foreach (var p in parts) Free(p);
        var scope = new Scope { joined };
        End(scope, outer, joined);
        return joined;
    }

    /// <summary>Backward of the tiled MLP, last tile first: each tile recomputed with grad, back-propagated, its input gradient added into one buffer.</summary>
    private Buf MlpTilesBackward(List<Buf> savedMlp)
    {
        long n = _n, tile = _o.MlpTileTokens;
        Buf? accumulated = null;
        Buf? returned = null;
        long tiles = (n + tile - 1) / tile;
        for (long k = tiles - 1; k >= 0; k--)
        {
            Free(returned);                                   // the checkpoint drops its last returned gradient (see Checkpoint)
            _n = Math.Min(tile, n - k * tile);
            var tileSaved = new LayerSaved();
            var recompute = new Scope();
            var view = new Buf(LayerWorkingSet, 0);
            var output = MlpUntiled(recompute, view, grad: true, tileSaved.Mlp);
            End(recompute, null, output);
            var pins = new List<Buf>();
            var gIn = MlpBackward(new Buf(LayerWorkingSet, 0), tileSaved.Mlp, pins); // the output gradient is a slice: a view
            Unpin(pins);
            Free(output);
            _n = n;
            var gSlice = Alloc(LayerWorkingSet, n * _h * _c);  // narrow backward: zeros + this tile's rows
            returned = gIn;
            if (accumulated is null) accumulated = gSlice;
            else Free(gSlice);                                // accumulated in place
        }
        Free(returned);
        Release(savedMlp);
        return accumulated!;
    }

    private Buf Mlp(Scope outer, Buf n2, bool grad, List<Buf>? saved) =>
        MlpTiled ? MlpTiles(outer, n2, grad, saved) : MlpUntiled(outer, n2, grad, saved);

    private Buf MlpUntiled(Scope outer, Buf n2, bool grad, List<Buf>? saved)
    {
        var s = new Scope();
        var gate = Proj(s, n2, _h, _i, "gate_proj", grad, saved);
        var silu = A(s, LayerWorkingSet, _n * _i * _c);
        if (grad) Save(gate, saved);
        Drop(gate);
        var up = Proj(s, n2, _h, _i, "up_proj", grad, saved);
        var prod = A(s, LayerWorkingSet, _n * _i * _c);
        if (grad)
        {
            Save(silu, saved);
            Save(up, saved);
        }
        Drop(silu); Drop(up);
        var down = Proj(s, prod, _i, _h, "down_proj", grad, saved);
        Drop(prod);
        End(s, outer, down);
        return down;
    }

    /// <summary>Backward of the (untiled) MLP: returns the gradient of its input, having released what it saved.</summary>
    private Buf MlpBackward(Buf gOut, List<Buf> savedMlp, List<Buf> pins)
    {
        var gProd = ProjBackward(gOut, _i, _h, "down_proj", pins);
        var gSilu = Alloc(LayerWorkingSet, _n * _i * _c);
        var gUp = Alloc(LayerWorkingSet, _n * _i * _c);
        Free(gProd);
        var gGate = Alloc(LayerWorkingSet, _n * _i * _c);   // silu backward
        Free(gSilu);
        var gN2 = ProjBackward(gUp, _h, _i, "up_proj", pins);
        Free(gUp);
        var gN2b = ProjBackward(gGate, _h, _i, "gate_proj", pins);
        Free(gGate);
        Free(gN2b);
        Release(savedMlp);
        return gN2;
    }

    /// <summary>Backward of one decoder layer (MLP first), releasing each part's saved tensors once it is done.</summary>
    private Buf LayerBackward(Buf gOut, LayerSaved ls, List<Buf> pins)
    {
        // MLP
        var gN2 = MlpTiled ? MlpTilesBackward(ls.Mlp) : MlpBackward(gOut, ls.Mlp, pins);
        var gH2 = NormBackward(gN2);
        Free(gN2);
        Release(ls.Norm2);
        var gH = Alloc(LayerWorkingSet, _n * _h * _c);      // residual: output grad + norm path
        Free(gH2);

        // attention
        var gMerged = ProjBackward(gH, _q, _h, "o_proj", pins);
        Buf? gScores = null, gScores2 = null;
        Buf gq, gk, gv;
        if (ByGroup)
        {
            gq = Alloc(LayerWorkingSet, _n * _q * _c);
            gk = Alloc(LayerWorkingSet, _n * _kv * _c);
            gv = Alloc(LayerWorkingSet, _n * _kv * _c);
            AttentionGroups(backward: true);
            Free(gMerged);
        }
        else
        {
        if (_o.AttentionMask)
        {
            gScores = Alloc(AttentionBuffers, ScoreBytes);
            gScores2 = Alloc(AttentionBuffers, ScoreBytes);
        }
        gq = Alloc(LayerWorkingSet, _n * _q * _c);
        gk = Alloc(LayerWorkingSet, _n * _q * _c);
        gv = Alloc(LayerWorkingSet, _n * _q * _c);
        Free(gScores); Free(gScores2);
        Free(gMerged);
        if (_kv != _q)
        {
            var gk2 = Alloc(LayerWorkingSet, _n * _kv * _c);
            var gv2 = Alloc(LayerWorkingSet, _n * _kv * _c);
            Free(gk); Free(gv);
            gk = gk2; gv = gv2;
        }
        }
        var gqr = RopeBackward(_q);
        Free(gq);
        var gkr = RopeBackward(_kv);
        Free(gk);
        var gN1 = ProjBackward(gqr, _h, _q, "q_proj", pins);
        Free(gqr);
        Free(ProjBackward(gkr, _h, _kv, "k_proj", pins));
        Free(gkr);
        Free(ProjBackward(gv, _h, _kv, "v_proj", pins));
        Free(gv);
        Release(ls.Attention);
        var gX = NormBackward(gN1);
        Free(gN1);
        Release(ls.Norm1);
        var gIn = Alloc(LayerWorkingSet, _n * _h * _c);
        Free(gX);
        Free(gH);
        return gIn;
    }
}
