using System.Text.Json.Nodes;

namespace QLora.Trainer.Tests;

/// <summary>
/// The tokenizer's own chat template, evaluated: the published Llama 3.2, Qwen2/2.5/3, Mistral and Gemma templates render
/// what transformers' apply_chat_template renders (expected texts worked out by hand from the templates), and the
/// assistant spans used for loss masking are where the answers are.
/// </summary>
public sealed class JinjaChatTemplateTests
{
    private static readonly DateTime FixedNow = new(2025, 3, 5, 9, 30, 0);

    private static ChatTemplate Evaluated(string source, string? bos, string? eos) => ChatTemplate.FromJinja(source, bos, eos).WithNow(FixedNow);

    private static string[] Answers(RenderedChat chat) => [.. chat.AssistantSpans.Select(s => chat.Text.Substring(s.Start, s.Length))];

    [Fact]
    public void Llama32WritesTheGivenDayAndTrimsContents()
    {
        var t = Evaluated(PublishedChatTemplates.Llama32, "<|begin_of_text|>", "<|eot_id|>");
        var chat = t.RenderWithSpans([ChatMessage.System(" Be brief. "), ChatMessage.User("Hi\n"), ChatMessage.Assistant("Hello!")], addGenerationPrompt: false);
        Assert.Equal(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 05 Mar 2025\n\nBe brief.<|eot_id|>" +
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>", chat.Text);
        Assert.Equal(["Hello!<|eot_id|>"], Answers(chat));
        Assert.Equal(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 05 Mar 2025\n\n<|eot_id|>" +
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            t.Render([ChatMessage.User("Hi")], addGenerationPrompt: true));
    }

    [Fact]
    public void Llama32BuiltInRendererWritesTheSameDate()
    {
        var builtIn = ChatTemplate.Detect(PublishedChatTemplates.Llama32, bosToken: "<|begin_of_text|>").WithNow(FixedNow);
        Assert.Equal(ChatTemplateFormat.Llama32, builtIn.Format);
        ChatMessage[] conversation = [ChatMessage.User("Hi"), ChatMessage.Assistant("Hello!")];
        var evaluated = Evaluated(PublishedChatTemplates.Llama32, "<|begin_of_text|>", "<|eot_id|>");
        Assert.Equal(evaluated.RenderWithSpans(conversation, false), builtIn.RenderWithSpans(conversation, false), RenderedChatComparer.Instance);
        Assert.Contains("Today Date: 05 Mar 2025\n", builtIn.Render(conversation, false));
    }

    [Fact]
    public void Qwen2InsertsItsDefaultSystemPromptFromARealNewlineTemplate()
    {
        var t = Evaluated(PublishedChatTemplates.Qwen2, null, "<|im_end|>");
        var chat = t.RenderWithSpans([ChatMessage.User("Hi"), ChatMessage.Assistant("Hello!")], false);
        Assert.Equal("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n", chat.Text);
        Assert.Equal(["Hello!<|im_end|>"], Answers(chat));

        var builtIn = ChatTemplate.Detect(PublishedChatTemplates.Qwen2);
        Assert.Equal(ChatTemplate.Qwen2DefaultSystemPrompt, builtIn.DefaultSystemPrompt);
        Assert.Equal(chat, builtIn.RenderWithSpans([ChatMessage.User("Hi"), ChatMessage.Assistant("Hello!")], false), RenderedChatComparer.Instance);
    }

    [Fact]
    public void Qwen25RendersItsDefaultSystemPromptOrTheGivenOne()
    {
        var t = Evaluated(PublishedChatTemplates.Qwen25, null, "<|im_end|>");
        Assert.Equal(
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
            t.Render([ChatMessage.User("Hi")], addGenerationPrompt: true));
        var chat = t.RenderWithSpans([ChatMessage.System("Be kind."), ChatMessage.User("Hi"), ChatMessage.Assistant(" Hello! "), ChatMessage.User("Bye"), ChatMessage.Assistant("Bye.")], false);
        Assert.Equal(
            "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n Hello! <|im_end|>\n" +
            "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nBye.<|im_end|>\n", chat.Text);
        Assert.Equal([" Hello! <|im_end|>", "Bye.<|im_end|>"], Answers(chat));
    }

    [Fact]
    public void Qwen3AddsAnEmptyThinkBlockToTheLastAnswerOnly()
    {
        var t = Evaluated(PublishedChatTemplates.Qwen3, null, "<|im_end|>");
        var chat = t.RenderWithSpans([ChatMessage.User("Hi"), ChatMessage.Assistant("A1"), ChatMessage.User("Q2"), ChatMessage.Assistant("A2")], false);
        Assert.Equal(
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n" +
            "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nA2<|im_end|>\n", chat.Text);
        Assert.Equal(["A1<|im_end|>", "<think>\n\n</think>\n\nA2<|im_end|>"], Answers(chat));
        Assert.Equal("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
            t.Render([ChatMessage.System("S"), ChatMessage.User("Hi")], addGenerationPrompt: true));
        // apply_chat_template(..., enable_thinking=False): the generation prompt closes an empty think block.
        Assert.Equal("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
            t.WithTemplateVariables(new Dictionary<string, JsonNode?> { ["enable_thinking"] = false }).Render([ChatMessage.User("Hi")], addGenerationPrompt: true));
        // A reasoning answer keeps its thoughts after the last user turn.
        Assert.Equal("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nhmm\n</think>\n\nA<|im_end|>\n",
            t.Render([ChatMessage.User("Hi"), ChatMessage.Assistant("<think>\nhmm\n</think>\n\nA")], false));
    }

    [Fact]
    public void MistralAsShippedTodayHasSpacesAndASystemMessage()
    {
        ChatMessage[] conversation = [ChatMessage.System("S"), ChatMessage.User("Q1"), ChatMessage.Assistant("A1"), ChatMessage.User("Q2"), ChatMessage.Assistant("A2")];
        var chat = Evaluated(PublishedChatTemplates.MistralSpaces, "<s>", "</s>").RenderWithSpans(conversation, false);
        Assert.Equal("<s> [INST] S\n\nQ1 [/INST] A1</s> [INST] Q2 [/INST] A2</s>", chat.Text);
        Assert.Equal([" A1</s>", " A2</s>"], Answers(chat));

        var builtIn = ChatTemplate.Detect(PublishedChatTemplates.MistralSpaces, bosToken: "<s>", eosToken: "</s>");
        Assert.Equal(ChatTemplateFormat.MistralSpaces, builtIn.Format);
        Assert.Equal(chat, builtIn.RenderWithSpans(conversation, false), RenderedChatComparer.Instance);
    }

    [Fact]
    public void MistralLate2023FormHasNoSpacesAndRefusesASystemMessage()
    {
        var t = Evaluated(PublishedChatTemplates.MistralLate2023, "<s>", "</s>");
        var chat = t.RenderWithSpans([ChatMessage.User("Q1"), ChatMessage.Assistant("A1")], false);
        Assert.Equal("<s>[INST] Q1 [/INST]A1</s>", chat.Text);
        Assert.Equal(["A1</s>"], Answers(chat));
        Assert.Equal(ChatTemplateFormat.Mistral, ChatTemplate.Detect(PublishedChatTemplates.MistralLate2023).Format);
        var e = Assert.Throws<ArgumentException>(() => t.Render([ChatMessage.System("S"), ChatMessage.User("Q")], false));
        Assert.Contains("Conversation roles must alternate user/assistant/user/assistant/...", e.Message);
    }

    [Fact]
    public void Gemma2RendersModelTurnsAndRefusesSystem()
    {
        var t = Evaluated(PublishedChatTemplates.Gemma2, "<bos>", "<eos>");
        var chat = t.RenderWithSpans([ChatMessage.User(" Q "), ChatMessage.Assistant("A\n")], false);
        Assert.Equal("<bos><start_of_turn>user\nQ<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n", chat.Text);
        Assert.Equal(["A<end_of_turn>"], Answers(chat));
        Assert.Equal("<bos><start_of_turn>user\nQ<end_of_turn>\n<start_of_turn>model\n", t.Render([ChatMessage.User("Q")], true));
        Assert.Contains("System role not supported", Assert.Throws<ArgumentException>(() => t.Render([ChatMessage.System("S"), ChatMessage.User("Q")], false)).Message);
    }

    [Fact]
    public void Gemma3PrefixesTheSystemMessageToTheFirstUserTurn()
    {
        var t = Evaluated(PublishedChatTemplates.Gemma3, "<bos>", "<eos>");
        var chat = t.RenderWithSpans([ChatMessage.System("S"), ChatMessage.User("Q"), ChatMessage.Assistant("A"), ChatMessage.User("Q2")], true);
        Assert.Equal("<bos><start_of_turn>user\nS\n\nQ<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n<start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model\n", chat.Text);
        Assert.Equal(["A<end_of_turn>"], Answers(chat));
    }

    [Fact]
    public void GenerationMarkersGiveTheSpansWhenTheTemplateHasThem()
    {
        const string source = "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}{{ m.content }}</s>{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}";
        var chat = Evaluated(source, null, null).RenderWithSpans([ChatMessage.User("q"), ChatMessage.Assistant("a")], false);
        Assert.Equal("<user>q<assistant>a</s>", chat.Text); // trim_blocks drops the newline after {% endif %}
        Assert.Equal(["a</s>"], Answers(chat));
    }

    [Fact]
    public void TheTokenizersTemplateIsEvaluatedFirstAndTheBuiltInIsTheFallback()
    {
        Assert.Equal(ChatTemplateFormat.Jinja, ChatTemplate.FromTokenizer(PublishedChatTemplates.Gemma3, null, "<bos>", "<eos>").Format);
        // A template that refuses the trial conversation by its own rule is still evaluated.
        const string needsSystem = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('needs a system turn') }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}";
        Assert.Equal(ChatTemplateFormat.Jinja, ChatTemplate.FromTokenizer(needsSystem, null, null, null).Format);

        // A construct the interpreter lacks, in a template a built-in renderer recognises: the built-in renders it.
        var withUnsupported = PublishedChatTemplates.MistralLate2023 + "{{ messages | wordwrap }}";
        Assert.Equal(ChatTemplateFormat.Mistral, ChatTemplate.FromTokenizer(withUnsupported, null, "<s>", "</s>").Format);

        // Neither: the error names the construct.
        var e = Assert.Throws<NotSupportedException>(() => ChatTemplate.FromTokenizer("{% include 'chat.jinja' %}", null, null, null));
        Assert.Contains("{% include %}", e.Message);
        e = Assert.Throws<NotSupportedException>(() => ChatTemplate.FromTokenizer("{% for m in messages %}{{ m.content | wordwrap(20) }}{% endfor %}", null, null, null));
        Assert.Contains("|wordwrap", e.Message);
    }

    [Fact]
    public void HfTokenizerEvaluatesItsChatTemplateAndEncodesAnswersOnlyAsTrainable()
    {
        var dir = TokenizerFixtures.WriteByteLevelFolder();
        try
        {
            using var tok = HfTokenizer.Load(dir);
            var template = tok.GetChatTemplate();
            Assert.Equal(ChatTemplateFormat.Jinja, template.Format);
            var chat = template.RenderWithSpans([ChatMessage.User("hello"), ChatMessage.Assistant("hello world")], false);
            Assert.Equal(ChatTemplate.ByName("llama3", tok.BosToken, tok.EosToken).RenderWithSpans([ChatMessage.User("hello"), ChatMessage.Assistant("hello world")], false), chat, RenderedChatComparer.Instance);
            var encoded = tok.EncodeChat(chat);
            Assert.Equal(tok.Encode("hello world<|eot_id|>", addSpecialTokens: false), encoded.InputIds.Where((_, i) => encoded.Trainable[i]));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    private sealed class RenderedChatComparer : IEqualityComparer<RenderedChat>
    {
        public static readonly RenderedChatComparer Instance = new();

        public bool Equals(RenderedChat? x, RenderedChat? y) => x!.Text == y!.Text && x.AssistantSpans.SequenceEqual(y.AssistantSpans);

        public int GetHashCode(RenderedChat obj) => obj.Text.GetHashCode(StringComparison.Ordinal);
    }
}
