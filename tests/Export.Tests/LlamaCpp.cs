using LLama;
using LLama.Common;
using LLama.Native;

namespace QLora.Export.Tests;

/// <summary>A GGUF file opened in llama.cpp (through LLamaSharp) on one thread, the fastest setting for a tiny model on 2 cores.</summary>
public sealed class LlamaCpp : IDisposable
{
    static LlamaCpp()
    {
        // Keep llama.cpp's load chatter out of the test log; warnings and errors still show.
        NativeLibraryConfig.All.WithLogCallback((level, message) => { if (level >= LLamaLogLevel.Warning) Console.Error.Write(message); });
    }

    /// <summary>Loads llama.cpp's native libraries (after the log callback is set, which must come first).</summary>
    public static void EnsureLoaded() => NativeApi.llama_max_devices();

    private readonly LLamaWeights _weights;
    private readonly LLamaContext _context;

    public LlamaCpp(string path)
    {
        var p = new ModelParams(path) { ContextSize = 256, BatchSize = 256, UBatchSize = 256, GpuLayerCount = 0, Threads = 1, BatchThreads = 1 };
        _weights = LLamaWeights.LoadFromFile(p);
        _context = _weights.CreateContext(p);
    }

    /// <summary>llama.cpp's tokenization, with BOS as the file's add_bos_token says.</summary>
    public int[] Tokenize(string text) => _context.Tokenize(text, addBos: _weights.Vocab.ShouldAddBOS, special: true).Select(t => (int)t).ToArray();

    /// <summary>Metadata value by key, as llama.cpp read it.</summary>
    public string? Metadata(string key) => _weights.Metadata.TryGetValue(key, out var v) ? v : null;

    /// <summary>llama.cpp's logits of every position of <paramref name="ids"/> (one batch, fresh KV cache).</summary>
    public float[][] Logits(int[] ids)
    {
        _context.NativeHandle.MemoryClear();
        var batch = new LLamaBatch();
        for (int i = 0; i < ids.Length; i++) batch.Add((LLamaToken)ids[i], i, LLamaSeqId.Zero, true);
        var rc = _context.NativeHandle.Decode(batch);
        if (rc != DecodeResult.Ok) throw new InvalidOperationException($"llama_decode: {rc}");
        return Enumerable.Range(0, ids.Length).Select(i => _context.NativeHandle.GetLogitsIth(i).ToArray()).ToArray();
    }

    public void Dispose()
    {
        _context.Dispose();
        _weights.Dispose();
    }
}
