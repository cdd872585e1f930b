using System.Text.Json.Nodes;
using NativeTokenizer = Tokenizers.DotNet.Tokenizer;
using NativeTokenizerException = Tokenizers.DotNet.TokenizerException;

namespace QLora.Trainer;

/// <summary>
/// Hugging Face's Rust tokenizers through Tokenizers.DotNet. The wrapper has one encode (with the post-processor) and
/// one decode (skipping special tokens), so variants of tokenizer.json stand in for the flags: without post_processor
/// for add_special_tokens=false, with every added token marked non-special for skip_special_tokens=false.
/// </summary>
internal sealed class NativeTokenizerEngine : ITokenizerEngine
{
    private readonly NativeTokenizer _asWritten;
    private readonly Lazy<NativeTokenizer> _withoutPostProcessor;
    private readonly Lazy<NativeTokenizer> _specialsVisible;
    private readonly string _source;

    /// <exception cref="InvalidDataException">The library refuses the file.</exception>
    /// <exception cref="PlatformNotSupportedException">The native library is not available for this platform.</exception>
    public NativeTokenizerEngine(string tokenizerJson, string source)
    {
        _source = source;
        // transformers turns off the truncation and padding a tokenizer.json may carry unless a call asks for them; so do we.
        _asWritten = Load(Variant(tokenizerJson, dropPostProcessor: false, specialsAsNormal: false), source);
        _withoutPostProcessor = new(() => Load(Variant(tokenizerJson, dropPostProcessor: true, specialsAsNormal: false), source));
        _specialsVisible = new(() => Load(Variant(tokenizerJson, dropPostProcessor: false, specialsAsNormal: true), source));
    }

    public TokenizerImplementation Implementation => TokenizerImplementation.Native;

    public int[] Encode(string text, bool addSpecialTokens)
    {
        var native = addSpecialTokens ? _asWritten : _withoutPostProcessor.Value;
        uint[] ids;
        try
        {
            ids = native.Encode(text);
        }
        catch (NativeTokenizerException e)
        {
            throw new InvalidOperationException($"{_source}: encoding failed: {e.Message}", e);
        }
        return Array.ConvertAll(ids, id => checked((int)id));
    }

    public string Decode(IReadOnlyList<int> ids, bool skipSpecialTokens)
    {
        var raw = new uint[ids.Count];
        for (int i = 0; i < raw.Length; i++)
            raw[i] = (uint)ids[i];
        var native = skipSpecialTokens ? _asWritten : _specialsVisible.Value;
        try
        {
            return native.Decode(raw);
        }
        catch (NativeTokenizerException e)
        {
            throw new InvalidOperationException($"{_source}: decoding failed: {e.Message}", e);
        }
    }

    public void Dispose()
    {
        _asWritten.Dispose();
        if (_withoutPostProcessor.IsValueCreated)
            _withoutPostProcessor.Value.Dispose();
        if (_specialsVisible.IsValueCreated)
            _specialsVisible.Value.Dispose();
    }

    private static NativeTokenizer Load(string json, string source)
    {
        // The wrapper loads from a path; a private temp copy lets us load edited variants the same way.
        var path = Path.Combine(Path.GetTempPath(), $"qlora-tokenizer-{Guid.NewGuid():N}.json");
        File.WriteAllText(path, json);
        try
        {
            return new NativeTokenizer(path);
        }
        catch (NativeTokenizerException e)
        {
            throw new InvalidDataException($"{source}: Hugging Face tokenizers could not load tokenizer.json: {e.Message}", e);
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException or BadImageFormatException
            || e is TypeInitializationException { InnerException: DllNotFoundException or EntryPointNotFoundException or BadImageFormatException })
        {
            throw new PlatformNotSupportedException(
                $"The Hugging Face tokenizers native library (libhf_tokenizers) is not available for {System.Runtime.InteropServices.RuntimeInformation.RuntimeIdentifier}: " +
                $"it is published for linux-x64 only. Use the managed tokenizer ({TokenizerSelection.EnvironmentVariable}=managed or auto).", e);
        }
        finally
        {
            File.Delete(path);
        }
    }

    // The tokenizer.json the native library loads: truncation and padding off (as transformers' encode), and
    // add_special_tokens=false: no post-processor (it only adds BOS/EOS/CLS-style ids; ByteLevel's part only moves offsets);
    // skip_special_tokens=false: added tokens marked non-special, because the wrapper's decode always skips special ones.
    private static string Variant(string json, bool dropPostProcessor, bool specialsAsNormal)
    {
        var root = JsonNode.Parse(json)!.AsObject();
        root["truncation"] = null;
        root["padding"] = null;
        if (dropPostProcessor)
            root["post_processor"] = null;
        if (specialsAsNormal && root["added_tokens"] is JsonArray added)
        {
            foreach (var t in added.OfType<JsonObject>())
                t["special"] = false;
        }
        return root.ToJsonString();
    }
}
