using System.Text.Json;
using System.Text.Json.Nodes;

namespace QLora.Trainer;

/// <summary>
/// A Hugging Face fast tokenizer loaded from a model folder. Encoding and decoding run either in Hugging Face's own Rust
/// <c>tokenizers</c> library (through Tokenizers.DotNet; linux-x64 only), or in the managed implementation of
/// tokenizer.json (every OS; BPE models: byte-level as in GPT-2 / Llama 3 / Qwen2, SentencePiece-style with Metaspace and
/// byte fallback as in Llama 2 / Mistral), which gives the same ids. <see cref="TokenizerSelection"/> says which.
/// Special tokens come from tokenizer_config.json, then special_tokens_map.json, then generation_config.json.
/// </summary>
public sealed class HfTokenizer : IDisposable
{
    private readonly ITokenizerEngine _engine;
    private readonly Dictionary<string, int> _tokenToId;
    private readonly string?[] _idToToken;
    private readonly HashSet<int> _specialIds;
    private bool _disposed;

    private HfTokenizer(string source, string tokenizerJson, JsonObject? tokenizerConfig, JsonObject? specialTokensMap, JsonObject? generationConfig, string? chatTemplateFile, TokenizerImplementation implementation)
    {
        Source = source;
        JsonObject root;
        try
        {
            root = JsonNode.Parse(tokenizerJson) as JsonObject ?? throw new InvalidDataException($"{source}: tokenizer.json is not a JSON object.");
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{source}: tokenizer.json is not valid JSON: {e.Message}", e);
        }
        (_tokenToId, _idToToken, _specialIds) = ReadVocabulary(root, source);
        VocabSize = _idToToken.Length;

        _engine = CreateEngine(root, tokenizerJson, source, implementation);

        // The tokenizer files decide; generation_config.json fills in only keys they do not mention at all
        // (Qwen2 writes "bos_token": null yet has a bos_token_id for generation: it has no BOS when tokenizing).
        string? FromTokenizerFiles(string key) => TokenString(tokenizerConfig, key) ?? TokenString(specialTokensMap, key);
        bool NamedInTokenizerFiles(string key) => tokenizerConfig?.ContainsKey(key) == true || specialTokensMap?.ContainsKey(key) == true;
        List<int> FromGeneration(string key)
        {
            var ids = Ids(generationConfig, key);
            foreach (var id in ids)
            {
                if (id < 0 || id >= VocabSize)
                    throw new InvalidDataException($"{source}: generation_config.json's {key} {id} is outside the tokenizer's vocabulary (0..{VocabSize - 1}).");
            }
            return ids;
        }

        BosToken = FromTokenizerFiles("bos_token");
        BosTokenId = ResolveId(BosToken, "bos_token") ?? (NamedInTokenizerFiles("bos_token") ? null : First(FromGeneration("bos_token_id")));
        BosToken ??= BosTokenId is int b ? _idToToken[b] : null;

        EosToken = FromTokenizerFiles("eos_token");
        var generationEos = FromGeneration("eos_token_id");
        EosTokenId = ResolveId(EosToken, "eos_token") ?? First(generationEos);
        EosToken ??= EosTokenId is int eosFromId ? _idToToken[eosFromId] : null;
        var eosIds = new List<int>();
        if (EosTokenId is int eos)
            eosIds.Add(eos);
        eosIds.AddRange(generationEos.Where(id => !eosIds.Contains(id)));
        EosTokenIds = eosIds;

        int? padId = ResolveId(FromTokenizerFiles("pad_token"), "pad_token")
            ?? (NamedInTokenizerFiles("pad_token") ? null : First(FromGeneration("pad_token_id")));
        PadTokenIsEos = padId is null && EosTokenId is not null;
        PadTokenId = padId ?? EosTokenId;

        UnkTokenId = ResolveId(FromTokenizerFiles("unk_token"), "unk_token");
        ChatTemplateSource = chatTemplateFile ?? ChatTemplateFrom(tokenizerConfig);
        CleanUpTokenizationSpaces = tokenizerConfig?["clean_up_tokenization_spaces"] is JsonValue clean && clean.TryGetValue<bool>(out var on) && on;
    }

    /// <summary>
    /// Whether <see cref="Decode"/> also applies transformers' Python-side clean-up (" ," → ",", " n't" → "n't", …):
    /// only when tokenizer_config.json sets clean_up_tokenization_spaces to true.
    /// </summary>
    public bool CleanUpTokenizationSpaces { get; }

    /// <summary>Which implementation encodes and decodes: <see cref="TokenizerImplementation.Native"/> or <see cref="TokenizerImplementation.Managed"/>.</summary>
    public TokenizerImplementation Implementation => _engine.Implementation;

    /// <summary>Where the tokenizer came from (folder or file), for messages.</summary>
    public string Source { get; }

    /// <summary>Number of token ids the tokenizer can produce: highest id in the model vocabulary or added tokens, plus one (transformers' <c>len(tokenizer)</c>).</summary>
    public int VocabSize { get; }

    /// <summary>The beginning-of-sequence token string, or null when the model has none (Qwen2).</summary>
    public string? BosToken { get; }

    /// <summary>The id of <see cref="BosToken"/>, or null.</summary>
    public int? BosTokenId { get; }

    /// <summary>The tokenizer's end-of-sequence string: what training appends after an answer.</summary>
    public string? EosToken { get; }

    /// <summary>The id of <see cref="EosToken"/>, or null when no config names one.</summary>
    public int? EosTokenId { get; }

    /// <summary>Every id that ends generation: <see cref="EosTokenId"/> first, then generation_config.json's eos_token_id list (Llama 3 has several).</summary>
    public IReadOnlyList<int> EosTokenIds { get; }

    /// <summary>The padding id: the configured pad token, else generation_config's pad_token_id, else <see cref="EosTokenId"/> (the usual fallback for Llama-family models; see <see cref="PadTokenIsEos"/>). Padded positions are masked out of the loss, so reusing EOS is harmless.</summary>
    public int? PadTokenId { get; }

    /// <summary>True when no pad token is configured and <see cref="PadTokenId"/> fell back to <see cref="EosTokenId"/>.</summary>
    public bool PadTokenIsEos { get; }

    /// <summary>The unknown-token id, or null (byte-level tokenizers have none).</summary>
    public int? UnkTokenId { get; }

    /// <summary>The Jinja chat template from chat_template.jinja or tokenizer_config.json (the "default" one when several are named), or null.</summary>
    public string? ChatTemplateSource { get; }

    /// <summary>
    /// Loads the tokenizer of a Hugging Face model folder: tokenizer.json (required) and, when present,
    /// tokenizer_config.json, special_tokens_map.json, generation_config.json and chat_template.jinja.
    /// </summary>
    /// <exception cref="DirectoryNotFoundException">The folder does not exist.</exception>
    /// <exception cref="FileNotFoundException">The folder has no tokenizer.json.</exception>
    /// <exception cref="InvalidDataException">A file is malformed or names a token the vocabulary lacks.</exception>
    public static HfTokenizer Load(string folder) => Load(folder, TokenizerSelection.FromEnvironment());

    /// <summary>Loads the tokenizer of a model folder with the given implementation (see <see cref="Load(string)"/>).</summary>
    /// <exception cref="PlatformNotSupportedException">Native was asked for where its library is missing.</exception>
    /// <exception cref="NotSupportedException">Managed was asked for (or is the only one here) and the file uses something it does not implement.</exception>
    public static HfTokenizer Load(string folder, TokenizerImplementation implementation)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(folder);
        if (!Directory.Exists(folder))
            throw new DirectoryNotFoundException($"Tokenizer folder '{folder}' does not exist.");
        var path = Path.Combine(folder, TokenizerFiles.TokenizerJson);
        if (!File.Exists(path))
        {
            var hint = File.Exists(Path.Combine(folder, "tokenizer.model"))
                ? " It has only a SentencePiece tokenizer.model: save the fast tokenizer once with transformers (AutoTokenizer.from_pretrained(folder).save_pretrained(folder)) to get tokenizer.json."
                : " Copy tokenizer.json (and tokenizer_config.json) from the model's Hugging Face repository.";
            throw new FileNotFoundException($"Tokenizer folder '{folder}' has no {TokenizerFiles.TokenizerJson}.{hint}", path);
        }
        var chatTemplatePath = Path.Combine(folder, "chat_template.jinja");
        return new HfTokenizer(folder, File.ReadAllText(path),
            ReadOptionalObject(Path.Combine(folder, TokenizerFiles.TokenizerConfig)),
            ReadOptionalObject(Path.Combine(folder, TokenizerFiles.SpecialTokensMap)),
            ReadOptionalObject(Path.Combine(folder, TokenizerFiles.GenerationConfig)),
            File.Exists(chatTemplatePath) ? File.ReadAllText(chatTemplatePath) : null, implementation);
    }

    /// <summary>Loads a bare tokenizer.json (no config files: special tokens unset, no chat template).</summary>
    /// <exception cref="FileNotFoundException">The file does not exist.</exception>
    public static HfTokenizer FromFile(string tokenizerJsonPath, TokenizerImplementation? implementation = null)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(tokenizerJsonPath);
        if (!File.Exists(tokenizerJsonPath))
            throw new FileNotFoundException($"Tokenizer file '{tokenizerJsonPath}' does not exist.", tokenizerJsonPath);
        return new HfTokenizer(tokenizerJsonPath, File.ReadAllText(tokenizerJsonPath), null, null, null, null, implementation ?? TokenizerSelection.FromEnvironment());
    }

    // Auto: the native library where it is published (linux-x64) and loads; otherwise, or when it is missing, the managed one.
    private static ITokenizerEngine CreateEngine(JsonObject root, string tokenizerJson, string source, TokenizerImplementation implementation)
    {
        switch (implementation)
        {
            case TokenizerImplementation.Native:
                return new NativeTokenizerEngine(tokenizerJson, source);
            case TokenizerImplementation.Managed:
                return CreateManaged(root, source);
            default:
                if (TokenizerSelection.NativePlatform)
                {
                    try
                    {
                        return new NativeTokenizerEngine(tokenizerJson, source);
                    }
                    catch (PlatformNotSupportedException)
                    {
                        // The native library did not load: fall through to the managed tokenizer.
                    }
                }
                return CreateManaged(root, source);
        }
    }

    private static ManagedTokenizer CreateManaged(JsonObject root, string source)
    {
        try
        {
            return new ManagedTokenizer(root, source);
        }
        catch (InvalidDataException e)
        {
            var why = e.Message.StartsWith(source + ": ", StringComparison.Ordinal) ? e.Message[(source.Length + 2)..] : e.Message;
            throw new InvalidDataException($"{source}: the managed tokenizer could not load tokenizer.json: {why}", e);
        }
    }

    /// <summary>
    /// Token ids of <paramref name="text"/>, as transformers' <c>tokenizer.encode(text, add_special_tokens=...)</c>.
    /// Special-token strings inside the text (e.g. &lt;|eot_id|&gt; in a rendered chat) become their ids.
    /// </summary>
    /// <param name="text">The text.</param>
    /// <param name="addSpecialTokens">Run the tokenizer's post-processor (adds BOS for Llama, nothing for GPT-2/Qwen2).</param>
    public int[] Encode(string text, bool addSpecialTokens = true)
    {
        ArgumentNullException.ThrowIfNull(text);
        ObjectDisposedException.ThrowIf(_disposed, this);
        return _engine.Encode(text, addSpecialTokens);
    }

    /// <summary>Text of token ids, as transformers' <c>tokenizer.decode(ids, skip_special_tokens=...)</c>.</summary>
    /// <param name="ids">Token ids, each in [0, <see cref="VocabSize"/>).</param>
    /// <param name="skipSpecialTokens">Leave out added tokens marked special (BOS, EOS, chat markers).</param>
    public string Decode(IReadOnlyList<int> ids, bool skipSpecialTokens = true)
    {
        ArgumentNullException.ThrowIfNull(ids);
        ObjectDisposedException.ThrowIf(_disposed, this);
        for (int i = 0; i < ids.Count; i++)
        {
            if (ids[i] < 0 || ids[i] >= VocabSize || _idToToken[ids[i]] is null)
                throw new ArgumentOutOfRangeException(nameof(ids), ids[i], $"Token id at position {i} is not in the vocabulary of {Source} (size {VocabSize}).");
        }
        var text = _engine.Decode(ids, skipSpecialTokens);
        return CleanUpTokenizationSpaces ? CleanUpTokenization(text) : text;
    }

    /// <summary>
    /// Tokenizes a rendered conversation (the template writes its own BOS, so no special tokens are added) and marks the
    /// tokens of its assistant spans as trainable. A span boundary maps to the token count of the text before it; every
    /// supported template ends an answer with a special token, so span ends are exact, and span starts are exact whenever
    /// the tokenizer does not merge across the boundary (the usual prompt-length masking).
    /// </summary>
    public TokenizedChat EncodeChat(RenderedChat chat)
    {
        ArgumentNullException.ThrowIfNull(chat);
        var ids = Encode(chat.Text, addSpecialTokens: false);
        var trainable = new bool[ids.Length];
        foreach (var span in chat.AssistantSpans)
        {
            if (span.Start < 0 || span.Length < 0 || span.End > chat.Text.Length)
                throw new ArgumentException($"Assistant span {span} lies outside the rendered text ({chat.Text.Length} characters).", nameof(chat));
            int from = TokenCountBefore(chat.Text, span.Start, ids.Length);
            int to = TokenCountBefore(chat.Text, span.End, ids.Length);
            for (int i = from; i < to; i++)
                trainable[i] = true;
        }
        return new TokenizedChat(ids, trainable);
    }

    private int TokenCountBefore(string text, int end, int total) =>
        end == text.Length ? total : Math.Min(Encode(text[..end], addSpecialTokens: false).Length, total);

    /// <summary>The id of a token string (vocabulary or added token, e.g. "&lt;|eot_id|&gt;"), or null.</summary>
    public int? TokenToId(string token)
    {
        ArgumentNullException.ThrowIfNull(token);
        return _tokenToId.TryGetValue(token, out var id) ? id : null;
    }

    /// <summary>The token string of an id (in the model's own alphabet, e.g. "Ġworld" or "▁world"), or null.</summary>
    public string? IdToToken(int id) => id >= 0 && id < _idToToken.Length ? _idToToken[id] : null;

    /// <summary>Whether the id is an added token marked special (skipped by <see cref="Decode"/> by default).</summary>
    public bool IsSpecialToken(int id) => _specialIds.Contains(id);

    /// <summary>
    /// Stops with a clear message when the tokenizer cannot belong to a model whose token embedding has
    /// <paramref name="embeddingRows"/> rows: it has more tokens than rows. More rows than tokens is accepted
    /// (embeddings are often padded, e.g. Qwen2's 151,936 rows for 151,665 tokens).
    /// </summary>
    /// <exception cref="TokenizerMismatchException">The tokenizer has ids the embedding lacks.</exception>
    public void EnsureMatchesEmbedding(int embeddingRows)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(embeddingRows);
        if (VocabSize <= embeddingRows)
            return;
        throw new TokenizerMismatchException(
            $"The tokenizer in {Source} has {VocabSize} tokens (ids 0..{VocabSize - 1}) but the model's embedding has only {embeddingRows} rows: " +
            $"ids {embeddingRows}..{VocabSize - 1} have no embedding. The tokenizer belongs to a different model, or tokens were added " +
            "without resizing the embedding; use the tokenizer files from the model's own repository.")
        {
            TokenizerVocabSize = VocabSize,
            EmbeddingRows = embeddingRows,
        };
    }

    /// <summary>
    /// The chat template for this tokenizer, with its BOS/EOS strings: the named built-in format when <paramref name="name"/>
    /// is given; else <see cref="ChatTemplateSource"/> itself, evaluated as transformers does, falling back to the built-in
    /// format recognised from it (or from <paramref name="modelType"/> when there is no template).
    /// </summary>
    /// <exception cref="NotSupportedException">No name was given and the template is missing, or neither evaluable nor a built-in format.</exception>
    public ChatTemplate GetChatTemplate(string? name = null, string? modelType = null)
    {
        // Templates take the tokenizer's own strings: {{ bos_token }} / {{ eos_token }} in the reference Jinja.
        if (name is not null)
            return ChatTemplate.ByName(name, BosToken ?? "", EosToken);
        var others = new Dictionary<string, string>(StringComparer.Ordinal);
        if (UnkTokenId is int unk && IdToToken(unk) is { } unkToken) others["unk_token"] = unkToken;
        if (!PadTokenIsEos && PadTokenId is int pad && IdToToken(pad) is { } padToken) others["pad_token"] = padToken;
        return ChatTemplate.FromTokenizer(ChatTemplateSource, modelType, BosToken, EosToken, others);
    }

    /// <summary>Releases the native tokenizers (nothing to release for the managed one).</summary>
    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        _engine.Dispose();
    }

    private int? ResolveId(string? token, string key)
    {
        if (token is null)
            return null;
        if (_tokenToId.TryGetValue(token, out var id))
            return id;
        throw new InvalidDataException($"{Source}: {key} '{token}' is named in the tokenizer config but is not a token of tokenizer.json.");
    }

    private static (Dictionary<string, int> TokenToId, string?[] IdToToken, HashSet<int> Special) ReadVocabulary(JsonObject root, string source)
    {
        var tokenToId = new Dictionary<string, int>(StringComparer.Ordinal);
        var model = root["model"] as JsonObject ?? throw new InvalidDataException($"{source}: tokenizer.json has no \"model\" section.");
        switch (model["vocab"])
        {
            case JsonObject dict: // BPE, WordPiece, WordLevel: token -> id
                foreach (var (token, value) in dict)
                    tokenToId[token] = value!.GetValue<int>();
                break;
            case JsonArray list: // Unigram: [piece, score] pairs, id = position
                for (int i = 0; i < list.Count; i++)
                    tokenToId[list[i]![0]!.GetValue<string>()] = i;
                break;
            default:
                throw new InvalidDataException($"{source}: tokenizer.json's model ({model["type"]}) has no vocabulary.");
        }
        var special = new HashSet<int>();
        if (root["added_tokens"] is JsonArray added)
        {
            foreach (var t in added.OfType<JsonObject>())
            {
                int id = t["id"]!.GetValue<int>();
                tokenToId[t["content"]!.GetValue<string>()] = id;
                if (t["special"]?.GetValue<bool>() == true)
                    special.Add(id);
            }
        }
        int size = tokenToId.Count == 0 ? 0 : tokenToId.Values.Max() + 1;
        var idToToken = new string?[size];
        foreach (var (token, id) in tokenToId)
        {
            if (id < 0)
                throw new InvalidDataException($"{source}: token '{token}' has a negative id.");
            idToToken[id] = token;
        }
        return (tokenToId, idToToken, special);
    }

    private static JsonObject? ReadOptionalObject(string path)
    {
        if (!File.Exists(path))
            return null;
        try
        {
            return JsonNode.Parse(File.ReadAllText(path)) as JsonObject
                ?? throw new InvalidDataException($"'{path}' is not a JSON object.");
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"'{path}' is not valid JSON: {e.Message}", e);
        }
    }

    // A special token is written either as a string or as an AddedToken object {"content": ...}.
    private static string? TokenString(JsonObject? config, string key) => config?[key] switch
    {
        JsonValue v when v.TryGetValue<string>(out var s) => s,
        JsonObject o => o["content"]?.GetValue<string>(),
        _ => null,
    };

    private static List<int> Ids(JsonObject? config, string key) => config?[key] switch
    {
        JsonArray a => a.Select(n => n!.GetValue<int>()).ToList(),
        JsonValue v when v.TryGetValue<int>(out var id) => [id],
        _ => [],
    };


    // transformers' clean_up_tokenization: the same replacements, in the same order.
    private static string CleanUpTokenization(string text) => text
        .Replace(" .", ".", StringComparison.Ordinal).Replace(" ?", "?", StringComparison.Ordinal)
        .Replace(" !", "!", StringComparison.Ordinal).Replace(" ,", ",", StringComparison.Ordinal)
        .Replace(" ' ", "'", StringComparison.Ordinal).Replace(" n't", "n't", StringComparison.Ordinal)
        .Replace(" 'm", "'m", StringComparison.Ordinal).Replace(" 's", "'s", StringComparison.Ordinal)
        .Replace(" 've", "'ve", StringComparison.Ordinal).Replace(" 're", "'re", StringComparison.Ordinal);

    private static int? First(List<int> ids) => ids.Count > 0 ? ids[0] : null;

    private static string? ChatTemplateFrom(JsonObject? config) => config?["chat_template"] switch
    {
        JsonValue v when v.TryGetValue<string>(out var s) => s,
        JsonArray named => named.OfType<JsonObject>()
            .FirstOrDefault(o => o["name"]?.GetValue<string>() == "default")?["template"]?.GetValue<string>(),
        _ => null,
    };
}
