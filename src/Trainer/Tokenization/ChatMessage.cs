namespace QLora.Trainer;

/// <summary>One turn of a conversation, as Hugging Face chat templates take it: a role (system, user, assistant) and its text.</summary>
/// <param name="Role">"system", "user" or "assistant" (Hugging Face role names).</param>
/// <param name="Content">The turn's text, without any template markup.</param>
public sealed record ChatMessage(string Role, string Content)
{
    /// <summary>The role name of system prompts.</summary>
    public const string SystemRole = "system";

    /// <summary>The role name of user turns.</summary>
    public const string UserRole = "user";

    /// <summary>The role name of model turns (the ones training learns).</summary>
    public const string AssistantRole = "assistant";

    /// <summary>A system prompt.</summary>
    public static ChatMessage System(string content) => new(SystemRole, content);

    /// <summary>A user turn.</summary>
    public static ChatMessage User(string content) => new(UserRole, content);

    /// <summary>An assistant turn.</summary>
    public static ChatMessage Assistant(string content) => new(AssistantRole, content);
}
