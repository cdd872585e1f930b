namespace QLora.Trainer;

/// <summary>The chat formats <see cref="ChatTemplate"/> renders natively (no Jinja engine): one per family of reference templates.</summary>
public enum ChatTemplateFormat
{
    /// <summary>Llama 3 / 3.0 Instruct: <c>&lt;|begin_of_text|&gt;&lt;|start_header_id|&gt;user&lt;|end_header_id|&gt;\n\n…&lt;|eot_id|&gt;</c>, contents trimmed. Name <c>llama3</c>.</summary>
    Llama3,

    /// <summary>Llama 3.1+ Instruct without tools: as <see cref="Llama3"/>, but a system block with the knowledge-cutoff and date lines always comes first. Name <c>llama3.1</c>.</summary>
    Llama31,

    /// <summary>ChatML as in Qwen2: <c>&lt;|im_start|&gt;user\n…&lt;|im_end|&gt;\n</c>, with an optional default system prompt. Name <c>chatml</c>.</summary>
    ChatMl,

    /// <summary>Mistral Instruct v0.1/v0.2 as first published (late 2023): <c>&lt;s&gt;[INST] … [/INST]…&lt;/s&gt;</c>, user/assistant alternating, no system role. Name <c>mistral</c>.</summary>
    Mistral,

    /// <summary>
    /// Mistral Instruct v0.1/v0.2 and Mixtral as their repositories ship them today: <c>&lt;s&gt; [INST] … [/INST] …&lt;/s&gt;</c> (a space
    /// before each [INST] and before each answer), with an optional system message prefixed to the first user turn. Name <c>mistral-spaces</c>.
    /// </summary>
    MistralSpaces,

    /// <summary>Llama 3.2 / 3.3 Instruct without tools: as <see cref="Llama31"/>, but "Today Date:" is the rendering day (strftime_now). Name <c>llama3.2</c>.</summary>
    Llama32,

    /// <summary>The tokenizer's own Jinja chat_template, evaluated by <see cref="JinjaTemplate"/> (any template in the supported Jinja subset). Name <c>jinja</c>.</summary>
    Jinja,

    /// <summary>Stanford Alpaca: "Below is an instruction that describes a task…", <c>### Instruction:</c> / <c>### Response:</c>, answers end with EOS. Name <c>alpaca</c>.</summary>
    Alpaca,
}
