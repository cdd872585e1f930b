using System.Text;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;

namespace QLora.Trainer;

/// <summary>
/// Renders conversations exactly as the Jinja chat template in a model's tokenizer_config.json does: by evaluating that
/// template (<see cref="FromJinja"/>, what a tokenizer's default is), or with a built-in renderer of one of the common
/// formats, chosen by name or recognised from signature substrings of the template (the fallback when the template uses a
/// construct the interpreter lacks). Rendering also reports where the assistant answers are, for loss masking.
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
        ["llama3.2"] = ChatTemplateFormat.Llama32,
        ["llama-3.2"] = ChatTemplateFormat.Llama32,
        ["llama3.3"] = ChatTemplateFormat.Llama32,
        ["mistral"] = ChatTemplateFormat.Mistral,
        ["mistral-spaces"] = ChatTemplateFormat.MistralSpaces,
        ["alpaca"] = ChatTemplateFormat.Alpaca,
    };

    private JinjaTemplate? _jinja;
    private IReadOnlyDictionary<string, string> _specialTokens = new Dictionary<string, string>();

    private ChatTemplate(ChatTemplateFormat format, string bosToken, string eosToken, string? defaultSystemPrompt)
    {
        Format = format;
        BosToken = bosToken;
        EosToken = eosToken;
        DefaultSystemPrompt = defaultSystemPrompt;
    }

    /// <summary>The canonical names <see cref="ByName"/> accepts (aliases aside).</summary>
    public static IReadOnlyList<string> Names { get; } = ["llama3", "llama3.1", "llama3.2", "chatml", "mistral", "mistral-spaces", "alpaca"];

    /// <summary>Which format this template renders.</summary>
    public ChatTemplateFormat Format { get; }

    /// <summary>The canonical name of <see cref="Format"/>.</summary>
    public string Name => Format switch
    {
        ChatTemplateFormat.Llama3 => "llama3",
        ChatTemplateFormat.Llama31 => "llama3.1",
        ChatTemplateFormat.ChatMl => "chatml",
        ChatTemplateFormat.Llama32 => "llama3.2",
        ChatTemplateFormat.Mistral => "mistral",
        ChatTemplateFormat.MistralSpaces => "mistral-spaces",
        ChatTemplateFormat.Jinja => "jinja",
        _ => "alpaca",
    };

    /// <summary>The BOS string the template writes first (Llama 3, Mistral, and Alpaca so that every format encodes with addSpecialTokens=false; ChatML writes none).</summary>
    public string BosToken { get; }

    /// <summary>The EOS string the template writes after assistant answers (Mistral, Alpaca).</summary>
    public string EosToken { get; }

    /// <summary>ChatML only: the system prompt inserted when the conversation does not start with one (Qwen2 does this; plain ChatML does not).</summary>
    public string? DefaultSystemPrompt { get; }

    /// <summary>Llama 3.1 only: the "Today Date:" the template writes (the reference's default unless set with <see cref="WithDateString"/>).</summary>
    public string DateString { get; private set; } = Llama31DefaultDate;

    /// <summary>A copy that writes <paramref name="date"/> (e.g. "01 Jan 2025", the reference's "%d %b %Y") as Llama 3.1's "Today Date:".</summary>
    public ChatTemplate WithDateString(string date)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(date);
        var copy = (ChatTemplate)MemberwiseClone();
        copy.DateString = date;
        return copy;
    }

    /// <summary>
    /// The clock a template reads (Jinja <c>strftime_now</c>, Llama 3.2's "Today Date:"); null means the local time at each
    /// render, as transformers does. Fix it with <see cref="WithNow"/> for reproducible renders.
    /// </summary>
    public DateTime? Now { get; private set; }

    /// <summary>A copy whose templates read <paramref name="now"/> as the current local time.</summary>
    public ChatTemplate WithNow(DateTime now)
    {
        var copy = (ChatTemplate)MemberwiseClone();
        copy.Now = now;
        return copy;
    }

    private IReadOnlyDictionary<string, JsonNode?> _templateVariables = new Dictionary<string, JsonNode?>();

    /// <summary>
    /// A copy that passes extra variables to an evaluated template, as apply_chat_template's keyword arguments do
    /// (e.g. Qwen3's <c>enable_thinking: false</c>, Llama 3's <c>date_string</c>). Ignored by the built-in renderers.
    /// </summary>
    public ChatTemplate WithTemplateVariables(IReadOnlyDictionary<string, JsonNode?> variables)
    {
        ArgumentNullException.ThrowIfNull(variables);
        var copy = (ChatTemplate)MemberwiseClone();
        copy._templateVariables = variables.ToDictionary(kv => kv.Key, kv => kv.Value?.DeepClone());
        return copy;
    }

    /// <summary>The Jinja source this template evaluates (<see cref="ChatTemplateFormat.Jinja"/> only), else null.</summary>
    public string? JinjaSource => _jinja?.Source;

    /// <summary>
    /// A template that evaluates the tokenizer's own Jinja <paramref name="source"/> with <see cref="JinjaTemplate"/>, passing
    /// bos_token, eos_token and any other special-token strings as variables, as transformers' apply_chat_template does.
    /// </summary>
    /// <exception cref="JinjaNotSupportedException">The template uses a construct the interpreter does not implement (named in the message).</exception>
    /// <exception cref="JinjaTemplateException">The template is malformed.</exception>
    public static ChatTemplate FromJinja(string source, string? bosToken, string? eosToken, IReadOnlyDictionary<string, string>? otherSpecialTokens = null)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(source);
        var specials = new Dictionary<string, string>(otherSpecialTokens ?? new Dictionary<string, string>(), StringComparer.Ordinal);
        if (bosToken is not null) specials["bos_token"] = bosToken;
        if (eosToken is not null) specials["eos_token"] = eosToken;
        return new ChatTemplate(ChatTemplateFormat.Jinja, bosToken ?? "", eosToken ?? "", null)
        {
            _jinja = JinjaTemplate.Parse(source),
            _specialTokens = specials,
        };
    }

    /// <summary>
    /// The template a tokenizer's <paramref name="jinjaTemplate"/> asks for: the template itself, evaluated, when the
    /// interpreter renders it; else the built-in format <see cref="Detect"/> recognises (the fallback); else an error that
    /// names the construct the interpreter lacks.
    /// </summary>
    /// <exception cref="NotSupportedException">Neither the interpreter nor a built-in renderer handles the template.</exception>
    public static ChatTemplate FromTokenizer(string? jinjaTemplate, string? modelType, string? bosToken, string? eosToken, IReadOnlyDictionary<string, string>? otherSpecialTokens = null)
    {
        if (string.IsNullOrWhiteSpace(jinjaTemplate))
            return Detect(jinjaTemplate, modelType, bosToken, eosToken);
        string why;
        try
        {
            var evaluated = FromJinja(jinjaTemplate, bosToken, eosToken, otherSpecialTokens);
            evaluated.TrialRender();
            return evaluated;
        }
        catch (JinjaTemplateException e) when (e is not JinjaRaisedException)
        {
            why = e.Message;
        }
        return TryDetect(jinjaTemplate, modelType, bosToken ?? "", eosToken) ?? throw new NotSupportedException(
            $"The tokenizer's chat template cannot be evaluated ({why}) and is not one of the built-in formats ({string.Join(", ", Names)}). Choose a format by name instead.");
    }

    // A short conversation through the template, so constructs it reaches only at render time are found before training starts.
    private void TrialRender()
    {
        try
        {
            RenderJinja([ChatMessage.User("Hi"), ChatMessage.Assistant("Hello")], addGenerationPrompt: false);
            RenderJinja([ChatMessage.User("Hi")], addGenerationPrompt: true);
        }
        catch (ArgumentException e) when (e.InnerException is JinjaRaisedException)
        {
            // The template refused this conversation shape (e.g. it needs a system turn): that is the template's rule, not a missing construct.
        }
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
            ChatTemplateFormat.Llama3 or ChatTemplateFormat.Llama31 or ChatTemplateFormat.Llama32 => ("<|begin_of_text|>", "<|eot_id|>"),
            ChatTemplateFormat.ChatMl => ("", "<|im_end|>"),
            ChatTemplateFormat.Mistral or ChatTemplateFormat.MistralSpaces => ("<s>", "</s>"),
            ChatTemplateFormat.Jinja => throw new ArgumentException("A Jinja template is made from its source: use FromJinja.", nameof(format)),
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
                return Create(t.Contains("strftime_now", StringComparison.Ordinal) ? ChatTemplateFormat.Llama32
                    : t.Contains("Cutting Knowledge Date", StringComparison.Ordinal) ? ChatTemplateFormat.Llama31 : ChatTemplateFormat.Llama3, bosToken, eosToken);
            if (t.Contains("<|im_start|>", StringComparison.Ordinal))
            {
                var m = ChatMlDefaultSystem().Match(t);
                return Create(ChatTemplateFormat.ChatMl, bosToken, eosToken, m.Success ? m.Groups[1].Value : null);
            }
            if (t.Contains("[INST]", StringComparison.Ordinal) && !t.Contains("<<SYS>>", StringComparison.Ordinal) && !t.Contains("[AVAILABLE_TOOLS]", StringComparison.Ordinal))
                return Create(t.Contains(" [INST] ", StringComparison.Ordinal) ? ChatTemplateFormat.MistralSpaces : ChatTemplateFormat.Mistral, bosToken, eosToken);
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
        if (_jinja is not null)
            return RenderJinjaWithSpans(messages, addGenerationPrompt);
        var w = new Writer();
        switch (Format)
        {
            case ChatTemplateFormat.Llama3: RenderLlama3(w, messages, addGenerationPrompt); break;
            case ChatTemplateFormat.Llama31: RenderLlama31(w, messages, addGenerationPrompt, DateString); break;
            case ChatTemplateFormat.Llama32: RenderLlama31(w, messages, addGenerationPrompt, JinjaGlobals.Strftime(Now ?? DateTime.Now, "%d %b %Y")); break;
            case ChatTemplateFormat.MistralSpaces: RenderMistralSpaces(w, messages); break;
            case ChatTemplateFormat.ChatMl: RenderChatMl(w, messages, addGenerationPrompt); break;
            case ChatTemplateFormat.Mistral: RenderMistral(w, messages); break;
            default: RenderAlpaca(w, messages, addGenerationPrompt); break;
        }
        return new RenderedChat(w.Text.ToString(), w.Spans);
    }

    private (string Text, IReadOnlyList<CharSpan> GenerationSpans) RenderJinja(IReadOnlyList<ChatMessage> messages, bool addGenerationPrompt)
    {
        var variables = new Dictionary<string, JsonNode?>(StringComparer.Ordinal)
        {
            ["messages"] = new JsonArray([.. messages.Select(m => (JsonNode)new JsonObject { ["role"] = m.Role, ["content"] = m.Content })]),
            ["add_generation_prompt"] = addGenerationPrompt,
            // transformers passes tools and documents always (None when not given).
            ["tools"] = null,
            ["documents"] = null,
        };
        foreach (var (name, value) in _specialTokens)
            variables[name] = value;
        foreach (var (name, value) in _templateVariables)
            variables[name] = value?.DeepClone();
        try
        {
            return _jinja!.RenderWithGenerationSpans(variables, Now ?? DateTime.Now);
        }
        catch (JinjaRaisedException e)
        {
            throw new ArgumentException($"The chat template refuses this conversation: {e.Message}", nameof(messages), e);
        }
    }

    // Assistant spans of an evaluated template: the {% generation %} blocks when it has them (transformers' own markers);
    // else, for each assistant turn, from the end of the conversation before it rendered with the generation prompt
    // (what the model is given) to the end of its turn (the conversation up to it rendered, trailing whitespace not
    // included, so the span ends with the end-of-turn marker as with the built-in renderers).
    private RenderedChat RenderJinjaWithSpans(IReadOnlyList<ChatMessage> messages, bool addGenerationPrompt)
    {
        var (text, generation) = RenderJinja(messages, addGenerationPrompt);
        if (generation.Count > 0)
            return new RenderedChat(text, generation);
        var spans = new List<CharSpan>();
        for (int i = 0; i < messages.Count; i++)
        {
            if (messages[i].Role != ChatMessage.AssistantRole)
                continue;
            var before = RenderJinja(messages.Take(i).ToList(), addGenerationPrompt: true).Text;
            if (!text.StartsWith(before, StringComparison.Ordinal))
                throw new NotSupportedException($"The chat template renders the turns before assistant message {i} differently once the conversation goes on, so the answer's position cannot be found; train on whole texts instead, or choose a built-in template by name.");
            var upTo = RenderJinja(messages.Take(i + 1).ToList(), addGenerationPrompt: false).Text;
            var turn = upTo[..TrimmedEnd(upTo)];
            int end;
            if (turn.Length > before.Length && text.StartsWith(turn, StringComparison.Ordinal))
            {
                end = turn.Length;
            }
            else
            {
                // The template writes a final turn differently from earlier ones (Qwen3 adds an empty <think> block to the
                // last answer): the span ends at the same end-of-turn marker after the answer's text in the full render.
                var content = JinjaTrim(messages[i].Content);
                int inTurn = content.Length == 0 ? -1 : turn.LastIndexOf(content, StringComparison.Ordinal);
                int inText = content.Length == 0 ? -1 : text.IndexOf(content, before.Length, StringComparison.Ordinal);
                var marker = inTurn < 0 ? "" : turn[(inTurn + content.Length)..];
                if (inText < 0 || marker.Length == 0 || string.CompareOrdinal(text, inText + content.Length, marker, 0, marker.Length) != 0)
                    throw new NotSupportedException($"The end of assistant message {i} cannot be located in the chat template's rendering; train on whole texts instead, or choose a built-in template by name.");
                end = inText + content.Length + marker.Length;
            }
            spans.Add(new CharSpan(before.Length, end - before.Length));
        }
        return new RenderedChat(text, spans);
    }

    private static int TrimmedEnd(string s)
    {
        int end = s.Length;
        while (end > 0 && char.IsWhiteSpace(s[end - 1])) end--;
        return end;
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
    private void RenderLlama31(Writer w, IReadOnlyList<ChatMessage> messages, bool addGenerationPrompt, string date)
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
            .Append("Today Date: ").Append(date).Append("\n\n")
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

    // Today's Mistral v0.1/v0.2/Mixtral template: bos, then ' [INST] ' + (system + '\n\n' for the first) + content + ' [/INST]' per user
    // turn and ' ' + content + eos per answer (the space belongs to the answer: it is the first token the model writes).
    private void RenderMistralSpaces(Writer w, IReadOnlyList<ChatMessage> messages)
    {
        int first = 0;
        string? system = null;
        if (messages.Count > 0 && messages[0].Role == ChatMessage.SystemRole)
        {
            system = messages[0].Content;
            first = 1;
        }
        w.Text.Append(BosToken);
        for (int i = first; i < messages.Count; i++)
        {
            var m = messages[i];
            if ((m.Role == ChatMessage.UserRole) != ((i - first) % 2 == 0))
                throw new ArgumentException($"After the optional system message, conversation roles must alternate user/assistant/user/assistant/... (message {i} is '{m.Role}').", nameof(messages));
            if (m.Role == ChatMessage.UserRole)
                w.Text.Append(" [INST] ").Append(i == first && system is not null ? system + "\n\n" : "").Append(m.Content).Append(" [/INST]");
            else if (m.Role == ChatMessage.AssistantRole)
                w.Append(" " + m.Content + EosToken, trainable: true);
            else
                throw new ArgumentException($"The mistral template supports user and assistant roles after an optional system message (message {i} is '{m.Role}').", nameof(messages));
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

    // '<|im_start|>system\n' + DEFAULT + '<|im_end|>' inside a Jinja string literal: the newline is the two characters \n
    // (Qwen2.5, whose tokenizer_config.json escapes the backslash) or a real newline (Qwen2, whose JSON \n decodes to one).
    [GeneratedRegex(@"<\|im_start\|>system(?:\\n|\n)([^'""<{}]+?)<\|im_end\|>")]
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
