namespace QLora.Trainer;

/// <summary>A chat template that is malformed, or that failed while rendering (an undefined name used, a type error), as Jinja itself would raise.</summary>
public class JinjaTemplateException(string message) : Exception(message);

/// <summary>
/// The template uses a Jinja construct (statement, filter, test, method or global) this interpreter does not implement.
/// The message names the construct, so a caller can fall back to a built-in renderer or tell the user what is missing.
/// </summary>
public sealed class JinjaNotSupportedException(string construct, string message) : JinjaTemplateException(message)
{
    /// <summary>The construct, e.g. "filter 'wordwrap'" or "statement 'include'".</summary>
    public string Construct { get; } = construct;
}

/// <summary>The template itself refused its input with <c>raise_exception(message)</c> (e.g. "Conversation roles must alternate…").</summary>
public sealed class JinjaRaisedException(string message) : JinjaTemplateException(message);
