
namespace QLora.Trainer.Tests;

/// <summary>Chat formats render what the reference Jinja templates produce, are detected from those templates, and report assistant spans.</summary>
public sealed class ChatTemplateTests
{
    private static readonly ChatMessage[] SystemUserAssistant =
    [
        ChatMessage.System("You are terse."),
        ChatMessage.User(" Hi \n"),
        ChatMessage.Assistant("Hello!"),
    ];

    // Meta-Llama-3-8B-Instruct's template, as tokenizer_config.json holds it (\n is backslash-n inside the Jinja string literals).
    private const string Llama3Jinja = @"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    private const string Llama31JinjaExcerpt = @"{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = ""26 Jul 2024"" %}{%- endif %}{{- ""<|start_header_id|>system<|end_header_id|>\n\n"" }}{{- ""Cutting Knowledge Date: December 2023\n"" }}{{- ""Today Date: "" + date_string + ""\n\n"" }}";

    private const string Qwen2Jinja = @"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    private const string Qwen25JinjaExcerpt = @"{%- else %}{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}{%- endif %}";

    private const string HermesChatMlJinja = @"{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    private const string MistralJinja = @"{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

    private const string Llama2Jinja = @"{% if messages[0]['role'] == 'system' %}{% set system_message = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}{% endif %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}";

    private const string AlpacaJinja = @"{% for message in messages %}{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token }}{% endif %}{% endfor %}";

    [Fact]
    public void Llama3RendersHeadersTrimmedContentAndEot()
    {
        var t = ChatTemplate.ByName("llama3");
        Assert.Equal(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>" +
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>" +
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>",
            t.Render(SystemUserAssistant, addGenerationPrompt: false));
        Assert.Equal(
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            t.Render([ChatMessage.User("Hi")], addGenerationPrompt: true));
    }

    [Fact]
    public void Llama31AlwaysWritesTheSystemBlockWithDate()
    {
        var t = ChatTemplate.ByName("llama3.1");
        Assert.Equal(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>" +
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            t.Render([ChatMessage.User("Hi")], addGenerationPrompt: true));
        Assert.Equal(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 01 Jan 2025\n\nYou are terse.<|eot_id|>" +
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>",
            t.WithDateString("01 Jan 2025").Render(SystemUserAssistant, addGenerationPrompt: false));
    }

    [Fact]
    public void Qwen2ChatMlInsertsItsDefaultSystemPrompt()
    {
        var t = ChatTemplate.ByName("qwen2");
        Assert.Equal(
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n",
            t.Render([ChatMessage.User("Hi"), ChatMessage.Assistant("Hello")], addGenerationPrompt: false));
        Assert.Equal(
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n Hi \n<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>assistant\n",
            t.Render(SystemUserAssistant, addGenerationPrompt: true));
        Assert.Equal("<|im_start|>user\nHi<|im_end|>\n", ChatTemplate.ByName("chatml").Render([ChatMessage.User("Hi")], false));
    }

    [Fact]
    public void MistralAlternatesInstBlocksAndEndsAnswersWithEos()
    {
        var t = ChatTemplate.ByName("mistral");
        var rendered = t.RenderWithSpans(
            [ChatMessage.User("Hi"), ChatMessage.Assistant("Hello"), ChatMessage.User("Again")], addGenerationPrompt: true);
        Assert.Equal("<s>[INST] Hi [/INST]Hello</s>[INST] Again [/INST]", rendered.Text);
        Assert.Equal(["Hello</s>"], rendered.AssistantSpans.Select(s => rendered.Text.Substring(s.Start, s.Length)));
        Assert.Contains("only user and assistant", Assert.Throws<ArgumentException>(() => t.Render(SystemUserAssistant, false)).Message);
        Assert.Contains("alternate", Assert.Throws<ArgumentException>(() => t.Render([ChatMessage.User("a"), ChatMessage.User("b")], false)).Message);
    }

    [Fact]
    public void AlpacaIsTheStanfordPrompt()
    {
        var t = ChatTemplate.ByName("alpaca");
        Assert.Equal(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n" +
            "### Instruction:\nName a color.\n\n### Response:\nBlue.</s>",
            t.Render([ChatMessage.User("Name a color."), ChatMessage.Assistant("Blue.")], addGenerationPrompt: false));
        Assert.Equal(
            "Be brief.\n\n### Instruction:\nName a color.\n\n### Response:\n",
            t.Render([ChatMessage.System("Be brief."), ChatMessage.User("Name a color.")], addGenerationPrompt: true));
    }

    [Fact]
    public void AssistantSpansCoverAnswersAndTheirEndMarkers()
    {
        foreach (var (name, end) in new[] { ("llama3", "<|eot_id|>"), ("llama3.1", "<|eot_id|>"), ("chatml", "<|im_end|>"), ("alpaca", "</s>") })
        {
            var r = ChatTemplate.ByName(name).RenderWithSpans(
                [ChatMessage.User("q1"), ChatMessage.Assistant("a1"), ChatMessage.User("q2"), ChatMessage.Assistant("a2")], addGenerationPrompt: false);
            Assert.Equal(["a1" + end, "a2" + end], r.AssistantSpans.Select(s => r.Text.Substring(s.Start, s.Length)));
        }
    }

    [Theory]
    [InlineData(Llama3Jinja, ChatTemplateFormat.Llama3)]
    [InlineData(Llama31JinjaExcerpt, ChatTemplateFormat.Llama31)]
    [InlineData(Qwen2Jinja, ChatTemplateFormat.ChatMl)]
    [InlineData(HermesChatMlJinja, ChatTemplateFormat.ChatMl)]
    [InlineData(MistralJinja, ChatTemplateFormat.Mistral)]
    [InlineData(AlpacaJinja, ChatTemplateFormat.Alpaca)]
    public void DetectsTheFormatFromTheJinjaTemplate(string jinja, ChatTemplateFormat expected)
    {
        Assert.Equal(expected, ChatTemplate.Detect(jinja).Format);
    }

    [Fact]
    public void DetectsChatMlDefaultSystemPrompts()
    {
        Assert.Equal("You are a helpful assistant.", ChatTemplate.Detect(Qwen2Jinja).DefaultSystemPrompt);
        Assert.Equal("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", ChatTemplate.Detect(Qwen25JinjaExcerpt).DefaultSystemPrompt);
        Assert.Null(ChatTemplate.Detect(HermesChatMlJinja).DefaultSystemPrompt);
    }

    [Fact]
    public void UnknownTemplatesAndNamesAreClearErrors()
    {
        Assert.Null(ChatTemplate.TryDetect(Llama2Jinja));
        var e = Assert.Throws<NotSupportedException>(() => ChatTemplate.Detect(Llama2Jinja));
        Assert.Contains("not one of the supported formats", e.Message);
        Assert.Contains("llama3, llama3.1, llama3.2, chatml, mistral, mistral-spaces, alpaca", e.Message);
        Assert.Contains("no chat_template", Assert.Throws<NotSupportedException>(() => ChatTemplate.Detect(null, "llama")).Message);
        Assert.Contains("Unknown chat template name 'vicuna'", Assert.Throws<ArgumentException>(() => ChatTemplate.ByName("vicuna")).Message);
    }

    [Fact]
    public void ModelTypeIsTheFallbackWhenThereIsNoTemplate()
    {
        var qwen = ChatTemplate.Detect(null, "qwen2");
        Assert.Equal(ChatTemplateFormat.ChatMl, qwen.Format);
        Assert.Equal(ChatTemplate.Qwen2DefaultSystemPrompt, qwen.DefaultSystemPrompt);
        Assert.Equal(ChatTemplateFormat.Mistral, ChatTemplate.Detect("", "mistral").Format);
    }

    [Fact]
    public void TokensPassedInReplaceTheFormatDefaults()
    {
        var t = ChatTemplate.ByName("mistral", bosToken: "<BOS>", eosToken: "<EOS>");
        Assert.Equal("<BOS>[INST] Hi [/INST]Yo<EOS>", t.Render([ChatMessage.User("Hi"), ChatMessage.Assistant("Yo")], false));
    }
}
