using System.Text.Json.Nodes;
using static QLora.Trainer.Tests.TokenizerFixtures;

namespace QLora.Trainer.Tests;

/// <summary>Which tokenizer implementation runs: QLORA_TOKENIZER's values, auto's choice, and what the managed one refuses.</summary>
public sealed class TokenizerSelectionTests : IDisposable
{
    private readonly List<string> _dirs = [];

    private string Track(string dir)
    {
        _dirs.Add(dir);
        return dir;
    }

    public void Dispose()
    {
        foreach (var d in _dirs)
            DeleteFolder(d);
    }

    [Theory]
    [InlineData(null, TokenizerImplementation.Auto)]
    [InlineData("", TokenizerImplementation.Auto)]
    [InlineData("auto", TokenizerImplementation.Auto)]
    [InlineData("Managed", TokenizerImplementation.Managed)]
    [InlineData(" native ", TokenizerImplementation.Native)]
    public void TheVariableNamesAChoice(string? value, TokenizerImplementation expected) =>
        Assert.Equal(expected, TokenizerSelection.Parse(value));

    [Fact]
    public void AnUnknownChoiceIsOneClearLine()
    {
        var e = Assert.Throws<ArgumentException>(() => TokenizerSelection.Parse("rust"));
        Assert.Contains("QLORA_TOKENIZER='rust'", e.Message);
        Assert.Contains("auto, managed or native", e.Message);
    }

    [Fact]
    public void TheVariableIsNotAJobKey()
    {
        // Job keys come from QLORA_<Section>__<Key>; a process setting without "__" must not be read as one (an unknown key
        // would stop every job). "auto" is the default, so setting it here changes nothing for tests running alongside.
        bool set = Environment.GetEnvironmentVariable(TokenizerSelection.EnvironmentVariable) is null;
        if (set)
            Environment.SetEnvironmentVariable(TokenizerSelection.EnvironmentVariable, "auto");
        try
        {
            Assert.DoesNotContain(JobConfiguration.EnvironmentOverrides().Keys, k => k.Contains("TOKENIZER", StringComparison.OrdinalIgnoreCase));
        }
        finally
        {
            if (set)
                Environment.SetEnvironmentVariable(TokenizerSelection.EnvironmentVariable, null);
        }
    }

    [Fact]
    public void AutoIsNativeWhereItIsPublishedAndManagedElsewhere()
    {
        var dir = Track(WriteByteLevelFolder());
        using var auto = HfTokenizer.Load(dir, TokenizerImplementation.Auto);
        Assert.Equal(TokenizerSelection.NativePlatform ? TokenizerImplementation.Native : TokenizerImplementation.Managed, auto.Implementation);
        using var managed = HfTokenizer.Load(dir, TokenizerImplementation.Managed);
        Assert.Equal(TokenizerImplementation.Managed, managed.Implementation);
        Assert.Equal([ByteLevelBos, Hello, World], managed.Encode("hello world"));
        Assert.Equal("hello world", managed.Decode([ByteLevelBos, Hello, World]));
        Assert.Equal("<|begin_of_text|>hello world", managed.Decode([ByteLevelBos, Hello, World], skipSpecialTokens: false));
    }

    [SkippableFact]
    public void NativeWhereItIsMissingSaysSo()
    {
        Skip.If(TokenizerSelection.NativePlatform, "the native library is published for this platform");
        var dir = Track(WriteByteLevelFolder());
        var e = Assert.Throws<PlatformNotSupportedException>(() => HfTokenizer.Load(dir, TokenizerImplementation.Native));
        Assert.Contains("managed", e.Message);
    }

    [Theory]
    [InlineData("model", "WordPiece")]
    [InlineData("normalizer", "Precompiled")]
    [InlineData("pre_tokenizer", "UnicodeScripts")]
    [InlineData("decoder", "CTC")]
    public void WhatTheManagedTokenizerDoesNotImplementIsRefusedByName(string section, string type)
    {
        var dir = Track(WriteByteLevelFolder());
        var path = Path.Combine(dir, "tokenizer.json");
        var root = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        if (section == "model")
            root["model"]!["type"] = type;
        else
            root[section] = new JsonObject { ["type"] = type };
        Write(dir, "tokenizer.json", root);
        var e = Assert.Throws<NotSupportedException>(() => HfTokenizer.Load(dir, TokenizerImplementation.Managed));
        Assert.Contains($"{section} is of type {type}", e.Message);
        Assert.Contains("QLORA_TOKENIZER=native", e.Message);
    }
}
