using static TorchSharp.torch;

namespace QLora.Trainer.Tests;

public class TrainingDataTests
{
    static (HfTokenizer Tokenizer, ChatTemplate Template, string Dir) ByteLevel()
    {
        var dir = TokenizerFixtures.WriteByteLevelFolder();
        var tok = HfTokenizer.Load(dir);
        return (tok, tok.GetChatTemplate(), dir);
    }

    [Fact]
    public void EachJsonlShapeIsReadAndAMalformedLineNamesItsFileAndLine()
    {
        using var dir = new TempFolder();
        var path = dir.File("d.jsonl");
        File.WriteAllLines(path, [
            """{"text": "hello world"}""",
            """{"instruction": "add", "input": "1 2", "output": "3"}""",
            "",
            """{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}""",
            """{"instruction": "add", "output": 3}""",
            """{"messages": [{"role": "robot", "content": "x"}]}""",
            "{not json",
        ]);
        var e = Assert.Throws<DataFormatException>(() => JsonlDataset.Read(path));
        Assert.Contains("d.jsonl:5", e.Message);
        Assert.Contains("\"output\" must be a string", e.Message);
        var r = JsonlDataset.Read(path, skipMalformed: true);
        Assert.Equal(3, r.SkippedLines);
        Assert.Equal([SampleFormat.Text, SampleFormat.Instruction, SampleFormat.Chat], r.Samples.Select(s => s.Format));
        Assert.Equal([1, 2, 4], r.Samples.Select(s => s.Line));
        Assert.Equal("add\n\n1 2", r.Samples[1].Messages![0].Content);
        Assert.Equal("3", r.Samples[1].ReferenceAnswer);
        Assert.Equal("a", r.Samples[2].ReferenceAnswer);
        var forced = Assert.Throws<DataFormatException>(() => JsonlDataset.Read(path, SampleFormat.Text));
        Assert.Contains("d.jsonl:2", forced.Message);
    }

    static string RepoRoot()
    {
        var dir = AppContext.BaseDirectory;
        while (!File.Exists(Path.Combine(dir, "QLora.sln"))) dir = Path.GetDirectoryName(dir)!;
        return dir;
    }

    /// <summary>
    /// A sample longer than <see cref="SampleEncoder.MaxTextChars"/> is cut before tokenizing, and its row is the one the
    /// whole text gives after truncation: ids and labels, for text and chat samples, with GPT-2's real 50k-merge BPE and
    /// the bundled model's tokenizer (the reference encodes the whole text with the native tokenizer and cuts the ids).
    /// </summary>
    [Fact]
    public void ATextCutBeforeTokenizingGivesTheRowOfTheWholeTextTruncated()
    {
        var gpt2Dir = TokenizerFixtures.WriteGpt2Folder();
        try
        {
            using var gpt2 = HfTokenizer.Load(gpt2Dir);
            using var bundled = HfTokenizer.Load(Path.Combine(RepoRoot(), "models", "tiny-llama-base"));
            var random = new Random(7);
            string[] words = ["the", "model", "quantized", " ", "\n", "ünïcödé", "日本語", "🙂", "----", "    ", "1234567", "a"];
            string Words(int chars)
            {
                var sb = new System.Text.StringBuilder(chars + 16);
                while (sb.Length < chars) sb.Append(words[random.Next(words.Length)]).Append(random.Next(3) == 0 ? "" : " ");
                return sb.ToString();
            }
            var texts = new[] { Words(60_000), new string('a', 60_000), string.Concat(Enumerable.Repeat("🙂", 30_000)), new string(' ', 60_001) + "x" };
            foreach (var (tok, template) in new[] { (gpt2, ChatTemplate.ByName("chatml", "", "<|endoftext|>")), (bundled, bundled.GetChatTemplate("mistral")) })
                foreach (int max in new[] { 16, 128 })
                {
                    var encoder = new SampleEncoder(tok, template, max);
                    foreach (var text in texts)
                    {
                        var e = encoder.Encode(new TrainingSample(SampleFormat.Text, text, null, 1));
                        Assert.True(e.CutBeforeTokenizing && e.Truncated);
                        Assert.Equal(tok.Encode(text, addSpecialTokens: true)[..max], e.InputIds);
                        Assert.Equal(e.InputIds, e.Labels);
                    }
                    // Chat: the long turn is the prompt (no target in the row), or the answer (targets from its start).
                    foreach (var messages in new List<ChatMessage>[]
                             {
                                 [ChatMessage.User(texts[0]), ChatMessage.Assistant("short answer")],
                                 [ChatMessage.User("a question"), ChatMessage.Assistant(texts[1]), ChatMessage.User(texts[2]), ChatMessage.Assistant("x")],
                                 [ChatMessage.User(Words(40)), ChatMessage.Assistant(Words(60)), ChatMessage.User(Words(30)), ChatMessage.Assistant(texts[0])],
                             })
                    {
                        var sample = new TrainingSample(SampleFormat.Chat, null, messages, 1);
                        var e = encoder.Encode(sample);
                        var whole = tok.EncodeChat(template.RenderWithSpans(messages, addGenerationPrompt: false));
                        Assert.True(e.CutBeforeTokenizing && e.Truncated);
                        Assert.Equal(whole.InputIds[..max], e.InputIds);
                        Assert.Equal(whole.Labels()[..max], e.Labels);
                    }
                    // What fits is not cut.
                    var small = encoder.Encode(new TrainingSample(SampleFormat.Text, "hello world", null, 1));
                    Assert.False(small.CutBeforeTokenizing);
                }
            // No limit (bench eval encodes with int.MaxValue): nothing is cut, and the bound does not overflow.
            var unbounded = new SampleEncoder(gpt2, ChatTemplate.ByName("chatml", "", "<|endoftext|>"), int.MaxValue);
            Assert.True(unbounded.MaxTextChars > int.MaxValue);
            var all = unbounded.Encode(new TrainingSample(SampleFormat.Text, texts[0], null, 1));
            Assert.False(all.CutBeforeTokenizing || all.Truncated);
        }
        finally
        {
            TokenizerFixtures.DeleteFolder(gpt2Dir);
        }
    }

    /// <summary>Lines are read from bytes in chunks: CRLF, a BOM, blank lines, a final line without '\n', and the hard line limit.</summary>
    [Fact]
    public void LinesAreSplitFromBytesAndAnOverlongLineIsOneMalformedLine()
    {
        using var dir = new TempFolder();
        var path = dir.File("d.jsonl");
        var longText = new string('é', 100_000); // 200,000 bytes of UTF-8, across chunk boundaries
        File.WriteAllBytes(path, [.. "\uFEFF{\"text\": \"one\"}\r\n\r\n   \n"u8, .. System.Text.Encoding.UTF8.GetBytes($"{{\"text\": \"{longText}\"}}\n"),
            .. "{\"text\": \""u8, .. Enumerable.Repeat((byte)'b', 250_000), .. "\"}\n{\"text\": \"last\"}"u8]);
        var all = JsonlDataset.Read(path);
        Assert.Equal(["one", longText, new string('b', 250_000), "last"], all.Samples.Select(s => s.Text));
        Assert.Equal([1, 4, 5, 6], all.Samples.Select(s => s.Line));
        var e = Assert.Throws<DataFormatException>(() => JsonlDataset.Read(path, maxLineBytes: 220_000));
        Assert.Contains("d.jsonl:5: the line is longer than 220,000 bytes", e.Message);
        var skipped = JsonlDataset.Read(path, skipMalformed: true, maxLineBytes: 220_000);
        Assert.Equal(["one", longText, "last"], skipped.Samples.Select(s => s.Text));
        Assert.Equal(1, skipped.SkippedLines);
    }

    [Fact]
    public void AJsonlFileWithWindowsLineEndingsAndABomReadsAsTheSameSamples()
    {
        // What Notepad and most Windows tools write: a UTF-8 BOM and CRLF line ends (jsonlines.org allows \r\n).
        using var dir = new TempFolder();
        string[] lines = [
            """{"text": "line one\r\nline two"}""",
            """{"instruction": "add", "input": "1 2", "output": "3"}""",
            "",
            """{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}""",
        ];
        var unix = dir.File("unix.jsonl");
        var windows = dir.File("windows.jsonl");
        File.WriteAllText(unix, string.Join("\n", lines) + "\n");
        File.WriteAllBytes(windows, [0xEF, 0xBB, 0xBF, .. System.Text.Encoding.UTF8.GetBytes(string.Join("\r\n", lines) + "\r\n")]);
        var expected = JsonlDataset.Read(unix).Samples;
        var actual = JsonlDataset.Read(windows).Samples;
        Assert.Equal(3, actual.Count);
        Assert.Equal("line one\r\nline two", actual[0].Text); // a CR inside a JSON string is text, kept
        Assert.Equal("3", actual[1].ReferenceAnswer);          // not "3\r"
        Assert.Equal("a", actual[2].ReferenceAnswer);
        Assert.Equal(expected.Select(s => (s.Format, s.Text, s.Line, s.ReferenceAnswer)), actual.Select(s => (s.Format, s.Text, s.Line, s.ReferenceAnswer)));
    }

    [Fact]
    public void OnlyAnswerTokensAreTargetsUnlessTrainingOnThePrompt()
    {
        var (tok, template, dir) = ByteLevel();
        try
        {
            var sample = TrainingSample.FromInstruction("add", "1 2", "3");
            // By hand: <|begin_of_text|> <|start_header_id|> u s e r <|end_header_id|> \n \n a d d \n \n 1 Ġ 2 <|eot_id|>
            // <|start_header_id|> a s s i s t a n t <|end_header_id|> \n \n 3 <|eot_id|>: 1+1+4+1+10+1 + 1+9+1+3+1 = 33 tokens,
            // of which the answer "3" and its <|eot_id|> are the targets.
            var e = new SampleEncoder(tok, template, 512).Encode(sample);
            Assert.Equal(33, e.InputIds.Length);
            Assert.Equal(2, e.TargetCount);
            Assert.Equal([(int)'3', TokenizerFixtures.EotId], e.Labels.Where(l => l != -100));
            var all = new SampleEncoder(tok, template, 512, trainOnPrompt: true).Encode(sample);
            Assert.Equal(33, all.TargetCount);

            // Two assistant turns: both answers (with their end-of-turn marker) are targets, the user turns are not.
            var chat = new TrainingSample(SampleFormat.Chat, null,
                [ChatMessage.User("hi"), ChatMessage.Assistant("ab"), ChatMessage.User("again"), ChatMessage.Assistant("c")], 1);
            Assert.Equal(2 + 1 + 1 + 1, new SampleEncoder(tok, template, 512).Encode(chat).TargetCount);

            // Plain text: BOS + hello + Ġworld + EOS, every position a target; truncation keeps the first tokens and says so.
            var text = new SampleEncoder(tok, template, 512).Encode(new TrainingSample(SampleFormat.Text, "hello world", null, 1));
            Assert.Equal([TokenizerFixtures.ByteLevelBos, TokenizerFixtures.Hello, TokenizerFixtures.World, TokenizerFixtures.EotId], text.InputIds);
            Assert.Equal(text.InputIds, text.Labels);
            var cut = new SampleEncoder(tok, template, 20).Encode(sample);
            Assert.True(cut.Truncated);
            Assert.Equal(20, cut.InputIds.Length);
            Assert.Equal(0, cut.TargetCount);
        }
        finally
        {
            tok.Dispose();
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public void APackedRowsLossEqualsTheSumOfItsSamplesLossesComputedAlone()
    {
        var rng = new Random(5);
        var samples = new[] { 7, 12, 5 }.Select(n =>
        {
            var ids = Enumerable.Range(0, n).Select(_ => rng.Next(1, 64)).ToArray();
            return new EncodedSample(ids, ids.Select((t, i) => i < 2 ? -100 : t).ToArray(), false);
        }).ToList();
        var rows = SequencePacker.Pack(samples, 20);
        Assert.Equal([19, 5], rows.Select(r => r.InputIds.Length)); // 7 + 12 fit a row of 20; the 5 starts the next (never split)
        var packedAll = SequencePacker.Pack(samples, 24);
        Assert.Single(packedAll);
        var row = packedAll[0];
        Assert.Equal([0, 1, 2, 3, 4, 5, 6, 0, 1], row.PositionIds[..9]);
        Assert.Equal(-100, row.Labels[7]); // the second sample's first token is never predicted from the first sample

        using var model = LlamaForCausalLM.CreateRandom(TinyLlama.Config(), 3, computeDType: ScalarType.Float32, initStd: 0.2);
        model.eval();
        using var noGrad = no_grad();
        double Loss(TokenRow r, out long n)
        {
            using var b = MicroBatch.Create([r], 0);
            var (sum, tokens) = model.Loss(b.InputIds, b.Labels, b.PositionIds, b.AttentionMask);
            n = tokens;
            using (sum) return sum.to(ScalarType.Float64).item<double>();
        }
        double packed = Loss(row, out long packedTokens);
        double separate = 0;
        long separateTokens = 0;
        foreach (var s in samples)
        {
            separate += Loss(TokenRow.Single(s), out long n);
            separateTokens += n;
        }
        Assert.Equal(separateTokens, packedTokens);
        Assert.Equal(separate, packed, 3);
        // Without the mask and position reset, the packed row would see the other samples: the loss differs.
        using var leaky = MicroBatch.Create([row], 0);
        var (leakySum, _) = model.Loss(leaky.InputIds, leaky.Labels);
        Assert.True(Math.Abs(leakySum.to(ScalarType.Float64).item<double>() - separate) > 1e-2);
    }

    [Fact]
    public void ThePackingMaskIsSameSegmentAndNotLaterForEveryRowAndPadding()
    {
        // Two packed rows of different lengths (the shorter is padded): the mask, checked element by element against
        // its definition (same segment, j ≤ i; padding its own segment).
        var a = new TokenRow([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 0], [0, 0, 0, 1, 1, 2]);
        var b = new TokenRow([7, 8, 9, 10], [7, 8, 9, 10], [0, 1, 0, 1], [0, 0, 1, 1]);
        using var batch = MicroBatch.Create([a, b], padId: 0);
        Assert.Equal([2, 1, 6, 6], batch.AttentionMask!.shape);
        var mask = batch.AttentionMask.data<bool>().ToArray();
        int[][] segments = [[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, -1, -1]];
        for (int r = 0; r < 2; r++)
            for (int i = 0; i < 6; i++)
                for (int j = 0; j < 6; j++)
                    Assert.Equal(j <= i && segments[r][i] == segments[r][j], mask[(r * 6 + i) * 6 + j]);
    }

    [Fact]
    public void PaddedBatchesAreGroupedByLengthAndTheScheduleIsAFunctionOfSeedAndEpoch()
    {
        var rows = Enumerable.Range(1, 40).Select(n => TokenRow.Single(new EncodedSample(new int[n], new int[n], false))).ToList();
        var a = new BatchSchedule(rows, 4, shuffle: true, groupByLength: true, seed: 1);
        var e0 = a.Epoch(0);
        Assert.Equal(10, e0.Count);
        Assert.Equal(e0.Select(b => string.Join(",", b)), new BatchSchedule(rows, 4, true, true, 1).Epoch(0).Select(b => string.Join(",", b)));
        Assert.NotEqual(e0.Select(b => string.Join(",", b)), a.Epoch(1).Select(b => string.Join(",", b)));
        Assert.Equal(Enumerable.Range(0, 40), e0.SelectMany(b => b).Order());
        // Length-grouped: each batch spans 4 consecutive lengths.
        Assert.All(e0, b => Assert.Equal(3, b.Max() - b.Min()));
        using var batch = MicroBatch.Create([rows[2], rows[9]], padId: 0);
        Assert.Equal([2, 10], batch.InputIds.shape);
        Assert.Null(batch.AttentionMask); // right padding under a causal mask needs no mask
        Assert.Equal(2 + 9, batch.TargetTokens);
    }
}
