using System.Text;
using System.Text.RegularExpressions;

namespace QLora.Trainer;

/// <summary>
/// Renders conversations in one of the common chat formats exactly as the reference Jinja template in a model's
/// tokenizer_config.json does for system/user/assistant turns, without a Jinja engine: the format is chosen by name or
/// detected from signature substrings of the template. Rendering also reports where the assistant answers are, for loss masking.
/// </summary>
public sealed partial class ChatTemplate
{
    /// <summary>The system prompt Qwen2 Instruct's ChatML template inserts when a conversation has none.</summary>
    public const string Qwen2DefaultSystemPrompt = "You are a helpful assistant.";

    /// <summary>The Alpaca preamble for an instruction without input (used when the conversation has no system message).</summary>
    public const string AlpacaPreamble = "Below is an instruction that describes a task. Write a response that appropriately completes the request.";

    /// <summary>The date Llama 3.1's template writes when the caller passes none.</summary>
    public const string Llama31DefaultDate = "26 Jul 2024";

    private static readonly Dictionary<string, ChatTemplateFormat> ByNames = new(StringComparer.OrdinalIgnoreCase)
    {
        ["llama3"] = ChatTemplateFormat.Llama3,
        ["llama-3"] = ChatTemplateFormat.Llama3,
        ["llama3.1"] = ChatTemplateFormat.Llama31,
        ["llama-3.1"] = ChatTemplateFormat.Llama31,
        ["chatml"] = ChatTemplateFormat.ChatMl,
        ["qwen"] = ChatTemplateFormat.ChatMl,
        ["qwen2"] = ChatTemplateFormat.ChatMl,
        ["mistral"] = ChatTemplateFormat.Mistral,
        ["alpaca"] = ChatTemplateFormat.Alpaca,
    };

    private ChatTemplate(ChatTemplateFormat format, string bosToken, string eosToken, string? defaultSystemPrompt)
    {
        Format = format;
        BosToken = bosToken;
        EosToken = eosToken;
        DefaultSystemPrompt = defaultSystemPrompt;
    }

    /// <summary>The canonical names <see cref="ByName"/> accepts (aliases aside).</summary>
    public static IReadOnlyList<string> Names { get; } = ["llama3", "llama3.1", "chatml", "mistral", "alpaca"];

    /// <summary>Which format this template renders.</summary>
    public ChatTemplateFormat Format { get; }

    /// <summary>The canonical name of <see cref="Format"/>.</summary>
    public string Name => Format switch
    {
        ChatTemplateFormat.Llama3 => "llama3",
        ChatTemplateFormat.Llama31 => "llama3.1",
        ChatTemplateFormat.ChatMl => "chatml",
        ChatTemplateFormat.Mistral => "mistral",
        _ => "alpaca",
    };

    /// <summary>The BOS string the template writes first (Llama 3, Mistral, and Alpaca so that every format encodes with addSpecialTokens=false; ChatML writes none).</summary>
    public string BosToken { get; }

    /// <summary>The EOS string the template writes after assistant answers (Mistral, Alpaca).</summary>
    public string EosToken { get; }

    /// <summary>ChatML only: the system prompt inserted when the conversation does not start with one (Qwen2 does this; plain ChatML does not).</summary>
    public string? DefaultSystemPrompt { get; }

    /// <summary>Llama 3.1 only: the "Today Date:" the template writes (the reference's default unless set with <see cref="WithDateString"/>).</summary>
    public string DateString { get; private init; } = Llama31DefaultDate;

    /// <summary>A copy that writes <paramref name="date"/> (e.g. "01 Jan 2025", the reference's "%d %b %Y") as Llama 3.1's "Today Date:".</summary>
    public ChatTemplate WithDateString(string date)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(date);
        return new ChatTemplate(Format, BosToken, EosToken, DefaultSystemPrompt) { DateString = date };
    }

    /// <summary>
    /// The template for a format name (<see cref="Names"/>; also "qwen2", "llama-3"). BOS/EOS default to the strings of
    /// the format's reference models (Llama 3: &lt;|begin_of_text|&gt;/&lt;|eot_id|&gt;; Mistral: &lt;s&gt;/&lt;/s&gt;;
    /// Alpaca: EOS &lt;/s&gt;); pass the tokenizer's own strings to override.
    /// </summary>
    public static ChatTemplate ByName(string name, string? bosToken = null, string? eosToken = null, string? defaultSystemPrompt = null)
    {
        ArgumentNullException.ThrowIfNull(name);
        if (!ByNames.TryGetValue(name.Trim(), out var format))
            throw new ArgumentException($"Unknown chat template name '{name}'. Known: {string.Join(", ", Names)}.", nameof(name));
        if (defaultSystemPrompt is null && format == ChatTemplateFormat.ChatMl && name.StartsWith("qwen", StringComparison.OrdinalIgnoreCase))
            defaultSystemPrompt = Qwen2DefaultSystemPrompt;
        return Create(format, bosToken, eosToken, defaultSystemPrompt);
    }

    /// <summary>The template for a format, with the given or the format's default BOS/EOS strings.</summary>
    public static ChatTemplate Create(ChatTemplateFormat format, string? bosToken = null, string? eosToken = null, string? defaultSystemPrompt = null)
    {
        var (bos, eos) = format switch
        {
            ChatTemplateFormat.Llama3 or ChatTemplateFormat.Llama31 => ("<|begin_of_text|>", "<|eot_id|>"),
            ChatTemplateFormat.ChatMl => ("", "<|im_end|>"),
            ChatTemplateFormat.Mistral => ("<s>", "</s>"),
            _ => ("", "</s>"),
        };
        return new ChatTemplate(format, bosToken ?? bos, eosToken ?? eos,
            format == ChatTemplateFormat.ChatMl ? defaultSystemPrompt : null);
    }

    /// <summary>
    /// Recognises the format of a Jinja chat template (tokenizer_config.json's <c>chat_template</c>) by its signature
    /// substrings, falling back to the model type (config.json's <c>model_type</c>: qwen2, mistral) when the template is
    /// absent. Returns null when neither identifies a supported format.
    /// </summary>
    public static ChatTemplate? TryDetect(string? jinjaTemplate, string? modelType = null, string? bosToken = null, string? eosToken = null)
    {
        if (!string.IsNullOrWhiteSpace(jinjaTemplate))
        {
            var t = jinjaTemplate;
            if (t.Contains("<|start_header_id|>", StringComparison.Ordinal))
                return Create(t.Contains("Cutting Knowledge Date", StringComparison.Ordinal) ? ChatTemplateFormat.Llama31 : ChatTemplateFormat.Llama3, bosToken, eosToken);
            if (t.Contains("<|im_start|>", StringComparison.Ordinal))
            {
                var m = ChatMlDefaultSystem().Match(t);
                return Create(ChatTemplateFormat.ChatMl, bosToken, eosToken, m.Success ? m.Groups[1].Value : null);
            }
            if (t.Contains("[INST]", StringComparison.Ordinal) && !t.Contains("<<SYS>>", StringComparison.Ordinal) && !t.Contains("[AVAILABLE_TOOLS]", StringComparison.Ordinal))
                return Create(ChatTemplateFormat.Mistral, bosToken, eosToken);
            if (t.Contains("### Instruction:", StringComparison.Ordinal) && t.Contains("### Response:", StringComparison.Ordinal))
                return Create(ChatTemplateFormat.Alpaca, bosToken, eosToken);
            return null;
        }
        return modelType?.Trim().ToLowerInvariant() switch
        {
            "qwen2" => Create(ChatTemplateFormat.ChatMl, bosToken, eosToken, Qwen2DefaultSystemPrompt),
            "mistral" => Create(ChatTemplateFormat.Mistral, bosToken, eosToken),
            _ => null,
        };
    }

    /// <summary>As <see cref="TryDetect"/>, but throws a <see cref="NotSupportedException"/> naming the supported formats when nothing matches.</summary>
    public static ChatTemplate Detect(string? jinjaTemplate, string? modelType = null, string? bosToken = null, string? eosToken = null)
        => TryDetect(jinjaTemplate, modelType, bosToken, eosToken) ?? throw new NotSupportedException(
            string.IsNullOrWhiteSpace(jinjaTemplate)
                ? $"No chat template to detect: tokenizer_config.json has no chat_template and model type '{modelType}' does not imply one. Choose one by name: {string.Join(", ", Names)}."
                : $"The chat template is not one of the supported formats ({string.Join(", ", Names)}); it starts: \"{Shorten(jinjaTemplate, 120)}\". Choose a format by name instead.");

    /// <summary>Renders the conversation as the reference template would (text only).</summary>
    /// <param name="messages">The turns, in order.</param>
    /// <param name="addGenerationPrompt">Append the header that asks the model for the next assistant turn (inference), as HF's add_generation_prompt.</param>
    public string Render(IReadOnlyList<ChatMessage> messages, bool addGenerationPrompt) => RenderWithSpans(messages, addGenerationPrompt).Text;

    /// <summary>Renders the conversation and reports the character span of each assistant answer plus its end-of-turn marker.</summary>
    /// <param name="messages">The turns, in order.</param>
    /// <param name="addGenerationPrompt">Append the header that asks the model for the next assistant turn.</param>
    public RenderedChat RenderWithSpans(IReadOnlyList<ChatMessage> messages, bool addGenerationPrompt)
    {
        ArgumentNullException.ThrowIfNull(messages);
        for (int i = 0; i < messages.Count; i++)
        {
            if (messages[i] is null || messages[i].Role is null || messages[i].Content is null)
                throw new ArgumentException($"Message {i} is null or has a null role or content.", nameof(messages));
        }
        var w = new Writer();
        switch (Format)
        {
            case ChatTemplateFormat.Llama3: RenderLlama3(w, messages, addGenerationPrompt); break;
            case ChatTemplateFormat.Llama31: RenderLlama31(w, messages, addGenerationPrompt); break;
            case ChatTemplateFormat.ChatMl: RenderChatMl(w, messages, addGenerationPrompt); break;
            case ChatTemplateFormat.Mistral: RenderMistral(w, messages); break;
            default: RenderAlpaca(w, messages, addGenerationPrompt); break;
        }
        return new RenderedChat(w.Text.ToString(), w.Spans);
    }

    // {% set content = '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + content|trim + '<|eot_id|>' %}, bos before the first.
    private void RenderLlama3(Writer w, IReadOnlyList<ChatMessage> messages, bool addGenerationPrompt)
    {
        if (messages.Count > 0)
            w.Text.Append(BosToken);
        foreach (var m in messages)
            LlamaTurn(w, m);
        if (addGenerationPrompt)
            w.Text.Append("<|start_header_id|>assistant<|end_header_id|>\n\n");
    }

    // Llama 3.1 without tools: bos, a system block (cutoff, date, then the trimmed system prompt or nothing), then Llama 3 turns.
    private void RenderLlama31(Writer w, IReadOnlyList<ChatMessage> messages, bool addGenerationPrompt)
    {
        w.Text.Append(BosToken);
        int first = 0;
        string system = "";
        if (messages.Count > 0 && messages[0].Role == ChatMessage.SystemRole)
        {
            system = JinjaTrim(messages[0].Content);
            first = 1;
        }
        w.Text.Append("<|start_header_id|>system<|end_header_id|>\n\n")
            .Append("Cutting Knowledge Date: December 2023\n")
            .Append("Today Date: ").Append(DateString).Append("\n\n")
            .Append(system).Append("<|eot_id|>");
        for (int i = first; i < messages.Count; i++)
            LlamaTurn(w, messages[i]);
        if (addGenerationPrompt)
            w.Text.Append("<|start_header_id|>assistant<|end_header_id|>\n\n");
    }

    private static void LlamaTurn(Writer w, ChatMessage m)
    {
        w.Text.Append("<|start_header_id|>").Append(m.Role).Append("<|end_header_id|>\n\n");
        w.Append(JinjaTrim(m.Content) + "<|eot_id|>", m.Role == ChatMessage.AssistantRole);
    }

    // '<|im_start|>' + role + '\n' + content + '<|im_end|>' + '\n'; Qwen2 first inserts its default system turn.
    private void RenderChatMl(Writer w, IReadOnlyList<ChatMessage> messages, bool addGenerationPrompt)
    {
        if (DefaultSystemPrompt is not null && messages.Count > 0 && messages[0].Role != ChatMessage.SystemRole)
            w.Text.Append("<|im_start|>system\n").Append(DefaultSystemPrompt).Append("<|im_end|>\n");
        foreach (var m in messages)
        {
            w.Text.Append("<|im_start|>").Append(m.Role).Append('\n');
            w.Append(m.Content + "<|im_end|>", m.Role == ChatMessage.AssistantRole);
            w.Text.Append('\n');
        }
        if (addGenerationPrompt)
            w.Text.Append("<|im_start|>assistant\n");
    }

    // bos_token, then '[INST] ' + content + ' [/INST]' for users and content + eos_token for assistants; roles must alternate starting with user.
    private void RenderMistral(Writer w, IReadOnlyList<ChatMessage> messages)
    {
        w.Text.Append(BosToken);
        for (int i = 0; i < messages.Count; i++)
        {
            var m = messages[i];
            if (m.Role != ChatMessage.UserRole && m.Role != ChatMessage.AssistantRole)
                throw new ArgumentException($"The mistral template supports only user and assistant roles (message {i} is '{m.Role}'); fold a system prompt into the first user message.", nameof(messages));
            if ((m.Role == ChatMessage.UserRole) != (i % 2 == 0))
                throw new ArgumentException($"The mistral template needs roles to alternate user/assistant/user/assistant/... (message {i} is '{m.Role}').", nameof(messages));
            if (m.Role == ChatMessage.UserRole)
                w.Text.Append("[INST] ").Append(m.Content).Append(" [/INST]");
            else
                w.Append(m.Content + EosToken, trainable: true);
        }
    }

    // The Stanford Alpaca prompt: preamble (or the system message), "### Instruction:" per user turn, "### Response:" per answer + EOS.
    private void RenderAlpaca(Writer w, IReadOnlyList<ChatMessage> messages, bool addGenerationPrompt)
    {
        int first = 0;
        string preamble = AlpacaPreamble;
        if (messages.Count > 0 && messages[0].Role == ChatMessage.SystemRole)
        {
            preamble = messages[0].Content;
            first = 1;
        }
        w.Text.Append(BosToken).Append(preamble).Append("\n\n");
        bool needSeparator = false;
        for (int i = first; i < messages.Count; i++)
        {
            var m = messages[i];
            if (needSeparator)
                w.Text.Append("\n\n");
            if (m.Role == ChatMessage.UserRole)
            {
                w.Text.Append("### Instruction:\n").Append(m.Content).Append("\n\n");
                needSeparator = false;
            }
            else if (m.Role == ChatMessage.AssistantRole)
            {
                w.Text.Append("### Response:\n");
                w.Append(m.Content + EosToken, trainable: true);
                needSeparator = true;
            }
            else
            {
                throw new ArgumentException($"The alpaca template supports a leading system message, then user and assistant roles (message {i} is '{m.Role}').", nameof(messages));
            }
        }
        if (addGenerationPrompt)
        {
            if (needSeparator)
                w.Text.Append("\n\n");
            w.Text.Append("### Response:\n");
        }
    }

    /// <summary>Jinja's trim filter is Python's str.strip(): Unicode whitespace plus the separators U+001C–U+001F.</summary>
    private static string JinjaTrim(string s)
    {
        static bool IsPythonSpace(char c) => char.IsWhiteSpace(c) || c is >= '\x1c' and <= '\x1f';
        int start = 0, end = s.Length;
        while (start < end && IsPythonSpace(s[start]))
            start++;
        while (end > start && IsPythonSpace(s[end - 1]))
            end--;
        return s[start..end];
    }

    private static string Shorten(string s, int max) => s.Length <= max ? s : s[..max] + "…";

    // '<|im_start|>system\n' + DEFAULT + '<|im_end|>' as written inside a Jinja string literal (the \n is two characters there).
    [GeneratedRegex(@"<\|im_start\|>system\\n([^'""<{}]+?)<\|im_end\|>")]
    private static partial Regex ChatMlDefaultSystem();

    private sealed class Writer
    {
        public StringBuilder Text { get; } = new();

        public List<CharSpan> Spans { get; } = [];

        public void Append(string s, bool trainable)
        {
            if (trainable)
                Spans.Add(new CharSpan(Text.Length, s.Length));
            Text.Append(s);
        }
    }
}
