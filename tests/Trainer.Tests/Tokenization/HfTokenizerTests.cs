using System.Text.Json.Nodes;
using static QLora.Trainer.Tests.TokenizerFixtures;

namespace QLora.Trainer.Tests;

/// <summary>HfTokenizer over hand-written byte-level and SentencePiece-style tokenizer.json files, with ids worked out from their merges.</summary>
public sealed class HfTokenizerTests : IDisposable
{
    private readonly List<string> _folders = [];

    private string Track(string dir)
    {
        _folders.Add(dir);
        return dir;
    }

    public void Dispose()
    {
        foreach (var d in _folders)
            DeleteFolder(d);
    }

    [Fact]
    public void ByteLevelBpeAppliesTheMergesInRankOrder()
    {
        using var tok = HfTokenizer.Load(Track(WriteByteLevelFolder()));
        // "hello" → h e l l o → he, ll → hell → hello; " world" → Ġ w o r l d → Ġw, or → Ġwor → Ġworl → Ġworld.
        Assert.Equal([Hello, World], tok.Encode("hello world", addSpecialTokens: false));
        Assert.Equal([ByteLevelBos, Hello, World], tok.Encode("hello world", addSpecialTokens: true));
        // Unmerged bytes keep their byte ids: ' ' = 32 (Ġ), '!' = 33, 'é' = C3 A9.
        Assert.Equal([32, Hello, 33], tok.Encode(" hello!", addSpecialTokens: false));
        Assert.Equal([0xC3, 0xA9], tok.Encode("é", addSpecialTokens: false));
    }

    [Fact]
    public void ByteLevelSpecialTokenStringsInTextBecomeTheirIds()
    {
        using var tok = HfTokenizer.Load(Track(WriteByteLevelFolder()));
        Assert.Equal([StartHeader, 'u', 's', 'e', 'r', EndHeader, Hello, EotId],
            tok.Encode("<|start_header_id|>user<|end_header_id|>hello<|eot_id|>", addSpecialTokens: false));
    }

    [Theory]
    [InlineData("hello world")]
    [InlineData("  Leading spaces, tabs\tand\nnewlines\n\n")]
    [InlineData("Ünïcödé ✓ 日本語 🙂 and emoji")]
    [InlineData("")]
    public void ByteLevelRoundTripsText(string text)
    {
        using var tok = HfTokenizer.Load(Track(WriteByteLevelFolder()));
        Assert.Equal(text, tok.Decode(tok.Encode(text, addSpecialTokens: false)));
        Assert.Equal(text, tok.Decode(tok.Encode(text, addSpecialTokens: true), skipSpecialTokens: true));
    }

    [Fact]
    public void DecodeKeepsSpecialTokensOnlyWhenAsked()
    {
        using var tok = HfTokenizer.Load(Track(WriteByteLevelFolder()));
        int[] ids = [ByteLevelBos, Hello, World, EotId];
        Assert.Equal("hello world", tok.Decode(ids, skipSpecialTokens: true));
        Assert.Equal("<|begin_of_text|>hello world<|eot_id|>", tok.Decode(ids, skipSpecialTokens: false));
        Assert.True(tok.IsSpecialToken(EotId));
        Assert.False(tok.IsSpecialToken(Hello));
    }

    [Fact]
    public void SpecialTokensComeFromTheConfigFiles()
    {
        using var tok = HfTokenizer.Load(Track(WriteByteLevelFolder()));
        Assert.Equal(ByteLevelBos, tok.BosTokenId);
        Assert.Equal("<|begin_of_text|>", tok.BosToken);
        Assert.Equal(EotId, tok.EosTokenId); // tokenizer_config.json's eos_token
        Assert.Equal([EotId, ByteLevelEnd], tok.EosTokenIds); // then generation_config.json's list, without duplicates
        Assert.Equal(EotId, tok.PadTokenId); // no pad token anywhere: falls back to EOS
        Assert.True(tok.PadTokenIsEos);
        Assert.Null(tok.UnkTokenId);
        Assert.Equal(270, tok.VocabSize);
        Assert.Equal(Hello, tok.TokenToId("hello"));
        Assert.Equal(World, tok.TokenToId("Ġworld"));
        Assert.Equal("Ġworld", tok.IdToToken(World));
        Assert.Null(tok.TokenToId("nope"));
    }

    [Fact]
    public void ExplicitPadTokenIsUsed()
    {
        var dir = Track(WriteByteLevelFolder(vocabExtra: 2));
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "tokenizer_config.json")))!.AsObject();
        config["pad_token"] = "<|reserved_special_token_1|>";
        Write(dir, "tokenizer_config.json", config);
        using var tok = HfTokenizer.Load(dir);
        Assert.Equal(EotId + 2, tok.PadTokenId);
        Assert.False(tok.PadTokenIsEos);
        Assert.Equal(272, tok.VocabSize);
    }

    [Fact]
    public void SentencePieceStyleBpeWithByteFallback()
    {
        using var tok = HfTokenizer.Load(Track(WriteSentencePieceFolder()));
        // "hello world" → "▁hello▁world" (Prepend + Replace) → ll, ▁h, ell, ▁hell, ▁hello, ▁w, or, ▁wor, ld, ▁world.
        Assert.Equal([SpHello, SpWorld], tok.Encode("hello world", addSpecialTokens: false));
        Assert.Equal([SpBos, SpHello, SpWorld], tok.Encode("hello world"));
        // 'é' and 'z' are not pieces: byte fallback to <0xC3><0xA9> and <0x7A>.
        Assert.Equal([SpH, SpByteBase + 0xC3, SpByteBase + 0xA9, SpByteBase + 0x7A], tok.Encode("héz", addSpecialTokens: false));
        Assert.Equal("hello world", tok.Decode([SpBos, SpHello, SpWorld]));
        Assert.Equal("héz", tok.Decode(tok.Encode("héz")));
        Assert.Equal("<s> hello world</s>", tok.Decode([SpBos, SpHello, SpWorld, SpEos], skipSpecialTokens: false));
    }

    [Fact]
    public void SentencePieceSpecialTokensFromSpecialTokensMap()
    {
        using var tok = HfTokenizer.Load(Track(WriteSentencePieceFolder()));
        Assert.Equal(SpBos, tok.BosTokenId);
        Assert.Equal(SpEos, tok.EosTokenId);
        Assert.Equal([SpEos], tok.EosTokenIds);
        Assert.Equal(SpUnk, tok.UnkTokenId);
        Assert.Equal(SpEos, tok.PadTokenId);
        Assert.Equal(277, tok.VocabSize);
        Assert.Null(tok.ChatTemplateSource);
    }

    [Fact]
    public void EmbeddingCheckAcceptsPaddedEmbeddingsAndRejectsSmallerOnes()
    {
        using var tok = HfTokenizer.Load(Track(WriteByteLevelFolder()));
        tok.EnsureMatchesEmbedding(270);
        tok.EnsureMatchesEmbedding(320); // padded to a multiple of 64, as Qwen2 does
        var e = Assert.Throws<TokenizerMismatchException>(() => tok.EnsureMatchesEmbedding(256));
        Assert.Equal(270, e.TokenizerVocabSize);
        Assert.Equal(256, e.EmbeddingRows);
        Assert.Contains("270 tokens", e.Message);
        Assert.Contains("only 256 rows", e.Message);
        Assert.Contains("256..269", e.Message);
    }

    [Fact]
    public void MissingFolderAndMissingTokenizerJsonSayWhatIsMissing()
    {
        var missing = Path.Combine(Path.GetTempPath(), "qlora-no-such-folder-" + Guid.NewGuid().ToString("N"));
        var e1 = Assert.Throws<DirectoryNotFoundException>(() => HfTokenizer.Load(missing));
        Assert.Contains(missing, e1.Message);

        var empty = Track(NewFolder());
        var e2 = Assert.Throws<FileNotFoundException>(() => HfTokenizer.Load(empty));
        Assert.Contains("has no tokenizer.json", e2.Message);
        Assert.Equal(Path.Combine(empty, "tokenizer.json"), e2.FileName);

        File.WriteAllText(Path.Combine(empty, "tokenizer.model"), "sentencepiece");
        var e3 = Assert.Throws<FileNotFoundException>(() => HfTokenizer.Load(empty));
        Assert.Contains("save_pretrained", e3.Message);

        var e4 = Assert.Throws<FileNotFoundException>(() => HfTokenizer.FromFile(Path.Combine(empty, "tokenizer.json")));
        Assert.Contains("does not exist", e4.Message);
    }

    [Fact]
    public void MalformedFilesAndUnknownSpecialTokensAreReported()
    {
        var dir = Track(NewFolder());
        File.WriteAllText(Path.Combine(dir, "tokenizer.json"), "{ not json");
        Assert.Contains("not valid JSON", Assert.Throws<InvalidDataException>(() => HfTokenizer.Load(dir)).Message);

        var byteLevel = Track(WriteByteLevelFolder());
        Write(byteLevel, "tokenizer_config.json", new JsonObject { ["pad_token"] = "<pad>" });
        var e = Assert.Throws<InvalidDataException>(() => HfTokenizer.Load(byteLevel));
        Assert.Contains("pad_token '<pad>'", e.Message);

        var badModel = Track(WriteByteLevelFolder());
        var root = JsonNode.Parse(File.ReadAllText(Path.Combine(badModel, "tokenizer.json")))!.AsObject();
        root["model"]!["type"] = "NoSuchModel";
        Write(badModel, "tokenizer.json", root);
        Assert.Contains("could not load tokenizer.json", Assert.Throws<InvalidDataException>(() => HfTokenizer.Load(badModel)).Message);
    }

    [Fact]
    public void DecodeRejectsIdsOutsideTheVocabulary()
    {
        using var tok = HfTokenizer.Load(Track(WriteByteLevelFolder()));
        Assert.Throws<ArgumentOutOfRangeException>(() => tok.Decode([Hello, 270]));
        Assert.Throws<ArgumentOutOfRangeException>(() => tok.Decode([-1]));
    }

    [Fact]
    public void ChatTemplateIsDetectedFromTheTokenizerConfigAndEncodesToSpecialIds()
    {
        using var tok = HfTokenizer.Load(Track(WriteByteLevelFolder()));
        var template = tok.GetChatTemplate();
        Assert.Equal(ChatTemplateFormat.Jinja, template.Format);
        var text = template.Render([ChatMessage.User("hello"), ChatMessage.Assistant("world")], addGenerationPrompt: false);
        var ids = tok.Encode(text, addSpecialTokens: false);
        Assert.Equal(ByteLevelBos, ids[0]);
        Assert.Equal(StartHeader, ids[1]);
        Assert.Equal(EotId, ids[^1]);
        Assert.Equal(text, tok.Decode(ids, skipSpecialTokens: false));
    }

    [Fact]
    public void EncodeChatMarksOnlyTheAssistantAnswerAndItsEot()
    {
        using var tok = HfTokenizer.Load(Track(WriteByteLevelFolder()));
        var chat = tok.GetChatTemplate().RenderWithSpans([ChatMessage.User("hello"), ChatMessage.Assistant("hello world")], addGenerationPrompt: false);
        var encoded = tok.EncodeChat(chat);
        int[] user = [ByteLevelBos, StartHeader, 'u', 's', 'e', 'r', EndHeader, '\n', '\n', Hello, EotId];
        int[] header = [StartHeader, 'a', 's', 's', 'i', 's', 't', 'a', 'n', 't', EndHeader, '\n', '\n'];
        int[] answer = [Hello, World, EotId];
        Assert.Equal([.. user, .. header, .. answer], encoded.InputIds);
        Assert.Equal(answer, encoded.InputIds.Where((_, i) => encoded.Trainable[i]));
        Assert.Equal(Enumerable.Repeat(TokenizedChat.IgnoreIndex, user.Length + header.Length).Concat(answer), encoded.Labels());
    }

    [Fact]
    public void TruncationAndPaddingInTokenizerJsonAreIgnoredAsTransformersDoes()
    {
        var dir = Track(WriteByteLevelFolder());
        var root = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "tokenizer.json")))!.AsObject();
        root["truncation"] = new JsonObject { ["direction"] = "Right", ["max_length"] = 2, ["strategy"] = "LongestFirst", ["stride"] = 0 };
        root["padding"] = new JsonObject
        {
            ["strategy"] = new JsonObject { ["Fixed"] = 8 }, ["direction"] = "Right", ["pad_to_multiple_of"] = null,
            ["pad_id"] = EotId, ["pad_type_id"] = 0, ["pad_token"] = "<|eot_id|>",
        };
        Write(dir, "tokenizer.json", root);
        using var tok = HfTokenizer.Load(dir);
        Assert.Equal([ByteLevelBos, Hello, World, 33], tok.Encode("hello world!"));
    }

    [Fact]
    public void ExplicitNullBosInTheTokenizerConfigWinsOverGenerationConfig()
    {
        // Qwen2: "bos_token": null in tokenizer_config.json, yet generation_config.json has a bos_token_id.
        var dir = Track(WriteByteLevelFolder());
        Write(dir, "tokenizer_config.json", new JsonObject { ["bos_token"] = null, ["eos_token"] = "<|eot_id|>", ["pad_token"] = "<|end_of_text|>" });
        Write(dir, "generation_config.json", new JsonObject { ["bos_token_id"] = ByteLevelEnd, ["eos_token_id"] = new JsonArray(EotId, ByteLevelEnd), ["pad_token_id"] = ByteLevelEnd });
        using var tok = HfTokenizer.Load(dir);
        Assert.Null(tok.BosTokenId);
        Assert.Null(tok.BosToken);
        Assert.Equal([EotId, ByteLevelEnd], tok.EosTokenIds);
        Assert.Equal(ByteLevelEnd, tok.PadTokenId);
        Assert.False(tok.PadTokenIsEos);
    }

    [Fact]
    public void GenerationConfigIdsOutsideTheVocabularyAreReported()
    {
        var dir = Track(WriteByteLevelFolder());
        Write(dir, "generation_config.json", new JsonObject { ["eos_token_id"] = new JsonArray(EotId, 128009) });
        var e = Assert.Throws<InvalidDataException>(() => HfTokenizer.Load(dir));
        Assert.Contains("eos_token_id 128009 is outside", e.Message);
    }

    [Fact]
    public void SentencePieceStyleWithMetaspacePreTokenizer()
    {
        // The newer (legacy=false, Mistral v0.3) layout: no normalizer, a Metaspace pre-tokenizer that prepends ▁ to the first word.
        var dir = Track(WriteSentencePieceFolder());
        var root = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "tokenizer.json")))!.AsObject();
        root["normalizer"] = null;
        root["pre_tokenizer"] = new JsonObject { ["type"] = "Metaspace", ["replacement"] = "▁", ["prepend_scheme"] = "first", ["split"] = false };
        root["decoder"] = new JsonObject { ["type"] = "Metaspace", ["replacement"] = "▁", ["prepend_scheme"] = "first", ["split"] = false };
        Write(dir, "tokenizer.json", root);
        using var tok = HfTokenizer.Load(dir);
        Assert.Equal([SpBos, SpHello, SpWorld], tok.Encode("hello world"));
        Assert.Equal("hello world", tok.Decode(tok.Encode("hello world")));
    }

    [Fact]
    public void UnigramVocabularyIsReadByPosition()
    {
        var dir = Track(NewFolder());
        string[] pieces = ["<unk>", "<s>", "</s>", "▁", "h", "e", "l", "o", "w", "r", "d", "▁hello", "▁world", "▁he", "llo"];
        double[] scores = [0, 0, 0, -5, -5, -5, -5, -5, -5, -5, -5, -2, -2, -3, -3];
        var metaspace = new JsonObject { ["type"] = "Metaspace", ["replacement"] = "▁", ["prepend_scheme"] = "always", ["split"] = true };
        Write(dir, "tokenizer.json", new JsonObject
        {
            ["version"] = "1.0", ["truncation"] = null, ["padding"] = null,
            ["added_tokens"] = new JsonArray(
                new JsonObject { ["id"] = 0, ["content"] = "<unk>", ["single_word"] = false, ["lstrip"] = false, ["rstrip"] = false, ["normalized"] = false, ["special"] = true },
                new JsonObject { ["id"] = 2, ["content"] = "</s>", ["single_word"] = false, ["lstrip"] = false, ["rstrip"] = false, ["normalized"] = false, ["special"] = true }),
            ["normalizer"] = null,
            ["pre_tokenizer"] = metaspace.DeepClone(),
            ["post_processor"] = null,
            ["decoder"] = metaspace.DeepClone(),
            ["model"] = new JsonObject
            {
                ["type"] = "Unigram", ["unk_id"] = 0, ["byte_fallback"] = false,
                ["vocab"] = new JsonArray(pieces.Select((p, i) => (JsonNode)new JsonArray(p, scores[i])).ToArray()),
            },
        });
        Write(dir, "tokenizer_config.json", new JsonObject { ["eos_token"] = "</s>", ["unk_token"] = "<unk>" });
        using var tok = HfTokenizer.Load(dir);
        // Viterbi: ▁hello (-2) beats ▁he + llo (-6) and single characters.
        Assert.Equal([11, 12], tok.Encode("hello world"));
        Assert.Equal(15, tok.VocabSize);
        Assert.Equal(13, tok.TokenToId("▁he"));
        Assert.Equal(2, tok.EosTokenId);
        Assert.Equal(0, tok.UnkTokenId);
        Assert.Equal("hello world", tok.Decode([11, 12, 2]));
    }

    [Fact]
    public void DecodeAppliesTransformersCleanUpOnlyWhenTheConfigAsks()
    {
        var dir = Track(WriteByteLevelFolder());
        using (var plain = HfTokenizer.Load(dir))
        {
            Assert.False(plain.CleanUpTokenizationSpaces);
            Assert.Equal("hello , world !", plain.Decode(plain.Encode("hello , world !")));
        }
        Write(dir, "tokenizer_config.json", new JsonObject { ["eos_token"] = "<|eot_id|>", ["clean_up_tokenization_spaces"] = true });
        using var clean = HfTokenizer.Load(dir);
        Assert.True(clean.CleanUpTokenizationSpaces);
        Assert.Equal("hello, world!", clean.Decode(clean.Encode("hello , world !")));
    }
}
