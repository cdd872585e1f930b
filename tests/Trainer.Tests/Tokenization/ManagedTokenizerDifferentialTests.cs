using System.Text;

namespace QLora.Trainer.Tests;

/// <summary>
/// The managed tokenizer against Hugging Face's own (the native Rust library, linux-x64): identical ids with and
/// without special tokens, and identical decodes with and without skipping them, on a corpus of multilingual text,
/// emoji, whitespace runs, digits, contractions, special tokens in text and edge cases, for the bundled model's
/// tokenizer and each tokenizer family built from GPT-2's real vocabulary. The native tokenizer exposes ids only (no
/// offsets), so offsets are not compared: HfTokenizer exposes none either.
/// </summary>
public sealed class ManagedTokenizerDifferentialTests(TokenizerFamilies families) : IClassFixture<TokenizerFamilies>
{
    private static readonly string[] Fixed =
    [
        "", " ", "a", "Z", "é", "日", "🙂", "\n", "\t", "\r\n", "  ", "'", "1", "_",
        "Hello world", "Hello, world!", " leading space", "trailing space ", "double  space", "tabs\tand\ttabs",
        "lines\nand\nlines\n\n\nthree", "windows\r\nline\r\nendings\r\n", "mixed \t\n \r\n  \t end",
        "                                                                  many spaces", "x" + new string(' ', 300) + "y", new string('\n', 40),
        "I'm sure they'll've done it; don't you? WE'RE HERE. She'S. IT'LL. I'D. You'VE", "'s 't 're 've 'm 'll 'd", "rock'n'roll ''quoted''",
        "1234567890 12 123 1234 12345 3.14159 1,000,000 -42 +7 0x1F 2024-12-02 10:30", "99999999999999999999999999999999999",
        "Café naïve façade coöperate résumé Ångström", "e\u0301 a\u0300 o\u0308 n\u0303 combining marks: Z\u0351\u036B\u0343\u036A\u0302\u036B\u033D\u034F\u0334\u0319",
        "日本語のテキストです。中文文本，包括标点符号！한국어 텍스트입니다.", "العربية نص تجريبي مع أرقام ١٢٣٤٥", "हिन्दी पाठ का उदाहरण है। संख्या १२३",
        "Русский текст и Ελληνικά κείμενα", "ﬁ ﬂ ① ² ½ ｈｅｌｌｏ ＡＢＣ Ⅻ ㎏", "İstanbul ıi ß ẞ Σίσυφος ΣΑΣ",
        "emoji 🙂🚀 and ZWJ 👨‍👩‍👧‍👦 👩🏽‍💻 flags 🇫🇷🇯🇵 🏳️‍🌈 keycap 1️⃣", "math 𝐀𝐁𝐂 𝟏𝟐𝟑 and CJK ext 𠀀𠀁𪜀 and 𐐀𐐨 deseret",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>",
        "<s>[INST] question [/INST] answer</s>", "text <s> inside </s> text<unk>", "<|endoftext|>", "<|endoftext|><|endoftext|>a<|endoftext|>",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n", "a <mask> b   <mask>c", "x [SEP]   y [SEP]",
        "qlora is qlora, not myqlora or qlora_x or qloras", "Ölflasche and die Ölflasche", "HeLLo Token and hello token", "<|eot|> vs <|eot_id|> vs <|eot",
        "[INST]   spaced   [INST]x", "def f(x):\n    return x ** 2  # comment\n\tif x:\n\t\tpass\n", "{\"json\": [1, 2, {\"k\": null}]}",
        "https://example.com/path?q=1&r=two#frag", "C:\\Users\\me\\file.txt", "a-b--c---d", "aeiou AEIOU xyz", "\u00A0nbsp\u2003em\u3000ideographic\u200Bzwsp",
        "\u0000\u0001\u001F\u007F control", "\uFEFFbom", "\uFFFD replacement", "▁already▁has▁metaspace",
    ];

    private static IEnumerable<string> Corpus()
    {
        foreach (var s in Fixed)
            yield return s;
        // Random mixtures of the fixed strings' pieces and single characters, reproducible.
        var rng = new Random(15);
        string[] atoms = [" ", "  ", "\n", "\t", "\r\n", "'s", "'LL", "123", "4567", "é", "e\u0301", "日本", "🙂", "👨‍👩‍👧", "🇫🇷", "𝐀", "<s>", "</s>",
            "<|eot_id|>", "<|endoftext|>", "<mask>", "[SEP]", "qlora", "[INST]", "Hello", "world", "ß", "İ", "١٢", "हि", "-", "!!", "...", "_", "ＡＢＣ", "▁"];
        for (int n = 0; n < 400; n++)
        {
            var sb = new StringBuilder();
            int parts = rng.Next(1, 12);
            for (int i = 0; i < parts; i++)
            {
                if (rng.Next(4) == 0)
                    sb.Append(Fixed[rng.Next(Fixed.Length)]);
                else
                    sb.Append(atoms[rng.Next(atoms.Length)]);
            }
            yield return sb.ToString();
        }
    }

    public static TheoryData<string> Families() => new(
        "bundled", "gpt2", "llama3", "qwen2", "llama2", "mistral", "variants-lower-nfkc-digits", "variants-punct-ws", "variants-split-behaviours");

    [SkippableTheory]
    [MemberData(nameof(Families))]
    public void ManagedMatchesNativeOnTheCorpus(string family)
    {
        Skip.IfNot(TokenizerSelection.NativePlatform, "the native tokenizer is published for linux-x64 only");
        var path = family == "bundled" ? Path.Combine(RepoRoot(), "models", "tiny-llama-base", "tokenizer.json") : families.Files[family];
        using var native = HfTokenizer.FromFile(path, TokenizerImplementation.Native);
        using var managed = HfTokenizer.FromFile(path, TokenizerImplementation.Managed);
        Assert.Equal(TokenizerImplementation.Native, native.Implementation);
        Assert.Equal(TokenizerImplementation.Managed, managed.Implementation);

        var failures = new List<string>();
        int texts = 0, roundTrips = 0;
        foreach (var text in Corpus())
        {
            texts++;
            foreach (var special in new[] { true, false })
            {
                var expected = native.Encode(text, special);
                var actual = managed.Encode(text, special);
                if (!expected.SequenceEqual(actual))
                {
                    failures.Add($"encode(add_special={special}) {Show(text)}: native [{string.Join(",", expected)}] managed [{string.Join(",", actual)}]");
                    continue;
                }
                foreach (var skip in new[] { true, false })
                {
                    var nd = native.Decode(expected, skip);
                    var md = managed.Decode(expected, skip);
                    if (nd != md)
                        failures.Add($"decode(skip={skip}) of {Show(text)}: native {Show(nd)} managed {Show(md)}");
                }
                // decode(encode(x)) == x wherever the native tokenizer gives it, then the managed one does too.
                if (!special && native.Decode(expected, skipSpecialTokens: false) == text)
                {
                    roundTrips++;
                    Assert.Equal(text, managed.Decode(actual, skipSpecialTokens: false));
                }
            }
        }
        Assert.True(failures.Count == 0, $"{family}: {failures.Count} differences over {texts} texts, e.g.\n{string.Join("\n", failures.Take(8))}");
        Assert.True(texts > 450);
        Assert.True(roundTrips > 0);
    }

    [SkippableFact]
    public void BothRefuseTextThatIsNotValidUnicode()
    {
        Skip.IfNot(TokenizerSelection.NativePlatform, "the native tokenizer is published for linux-x64 only");
        using var native = HfTokenizer.FromFile(families.Files["gpt2"], TokenizerImplementation.Native);
        using var managed = HfTokenizer.FromFile(families.Files["gpt2"], TokenizerImplementation.Managed);
        foreach (var text in new[] { "lone \uD800 high", "low \uDC00 first", "end \uD83D" })
        {
            Assert.Throws<InvalidOperationException>(() => native.Encode(text));
            var e = Assert.Throws<InvalidOperationException>(() => managed.Encode(text));
            Assert.Contains("lone UTF-16 surrogate", e.Message);
        }
    }

    private static string Show(string s) => "\"" + string.Concat(s.Select(c => c < 0x20 || c is >= '\u007F' and <= '\u00A0' || char.IsSurrogate(c) ? $"\\u{(int)c:X4}" : c.ToString())) + "\"";

    private static string RepoRoot()
    {
        var dir = AppContext.BaseDirectory;
        while (!File.Exists(Path.Combine(dir, "QLora.sln"))) dir = Path.GetDirectoryName(dir)!;
        return dir;
    }
}
