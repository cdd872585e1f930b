namespace QLora.Trainer;

/// <summary>A parsed Jinja expression.</summary>
internal abstract record JinjaExpr(int Line);

internal sealed record LiteralExpr(object? Value, int Line) : JinjaExpr(Line);
internal sealed record NameExpr(string Name, int Line) : JinjaExpr(Line);
internal sealed record ListExpr(List<JinjaExpr> Items, bool IsTuple, int Line) : JinjaExpr(Line);
internal sealed record DictExpr(List<(JinjaExpr Key, JinjaExpr Value)> Items, int Line) : JinjaExpr(Line);
internal sealed record AttributeExpr(JinjaExpr Target, string Name, int Line) : JinjaExpr(Line);
internal sealed record ItemExpr(JinjaExpr Target, JinjaExpr Index, int Line) : JinjaExpr(Line);
internal sealed record SliceExpr(JinjaExpr Target, JinjaExpr? Start, JinjaExpr? Stop, JinjaExpr? Step, int Line) : JinjaExpr(Line);
internal sealed record CallExpr(JinjaExpr Callee, List<JinjaExpr> Args, List<(string Name, JinjaExpr Value)> Kwargs, int Line) : JinjaExpr(Line);
internal sealed record FilterExpr(JinjaExpr Target, string Name, List<JinjaExpr> Args, List<(string Name, JinjaExpr Value)> Kwargs, int Line) : JinjaExpr(Line);
internal sealed record TestExpr(JinjaExpr Target, string Name, List<JinjaExpr> Args, bool Negated, int Line) : JinjaExpr(Line);
internal sealed record UnaryExpr(string Op, JinjaExpr Operand, int Line) : JinjaExpr(Line);
internal sealed record BinaryExpr(string Op, JinjaExpr Left, JinjaExpr Right, int Line) : JinjaExpr(Line);
internal sealed record CompareExpr(JinjaExpr First, List<(string Op, JinjaExpr Operand)> Rest, int Line) : JinjaExpr(Line);
internal sealed record ConditionalExpr(JinjaExpr Condition, JinjaExpr Then, JinjaExpr? Else, int Line) : JinjaExpr(Line);

/// <summary>A parsed Jinja statement (or literal text).</summary>
internal abstract record JinjaNode(int Line);

internal sealed record TextNode(string Text, int Line) : JinjaNode(Line);
internal sealed record OutputNode(JinjaExpr Value, int Line) : JinjaNode(Line);
internal sealed record IfNode(List<(JinjaExpr Condition, List<JinjaNode> Body)> Branches, List<JinjaNode>? Else, int Line) : JinjaNode(Line);
internal sealed record ForNode(List<string> Targets, JinjaExpr Iterable, JinjaExpr? Filter, List<JinjaNode> Body, List<JinjaNode>? Else, int Line) : JinjaNode(Line);

/// <summary><c>{% set a = … %}</c>, <c>{% set a, b = … %}</c>, <c>{% set ns.attr = … %}</c> (Namespace set) or a block set (Value null, Body set).</summary>
internal sealed record SetNode(List<string> Targets, string? NamespaceAttribute, JinjaExpr? Value, List<JinjaNode>? Body, int Line) : JinjaNode(Line);
internal sealed record MacroNode(string Name, List<(string Name, JinjaExpr? Default)> Parameters, List<JinjaNode> Body, int Line) : JinjaNode(Line);

/// <summary>transformers' <c>{% generation %}</c> block: marks the assistant text for return_assistant_tokens_mask.</summary>
internal sealed record GenerationNode(List<JinjaNode> Body, int Line) : JinjaNode(Line);
internal sealed record LoopControlNode(bool IsBreak, int Line) : JinjaNode(Line);
