using System.Globalization;

namespace QLora.Trainer;

/// <summary>Parses the segments of <see cref="JinjaLexer"/> into statements and expressions, with Jinja's operator precedence.</summary>
internal sealed class JinjaParser
{
    private static readonly HashSet<string> Unsupported = ["include", "import", "from", "extends", "block", "endblock", "call", "endcall", "filter", "endfilter", "with", "endwith", "raw", "endraw", "do", "autoescape", "endautoescape", "trans"];

    private readonly List<JinjaSegment> _segments;
    private int _segment;
    private List<JinjaToken> _tokens = [];
    private int _pos;

    private JinjaParser(List<JinjaSegment> segments) => _segments = segments;

    public static List<JinjaNode> Parse(string source)
    {
        var parser = new JinjaParser(JinjaLexer.Split(source));
        var body = parser.ParseBody([], out var stop);
        if (stop is not null)
            throw new JinjaTemplateException($"Line {stop.Value.Line}: unexpected {{% {stop.Value.Text} %}} with nothing open.");
        return body;
    }

    // Parses nodes until a statement whose first word is in `stops` (returned, its tokens left at _tokens/_pos after the word) or the end.
    private List<JinjaNode> ParseBody(HashSet<string> stops, out JinjaToken? stop)
    {
        var nodes = new List<JinjaNode>();
        while (_segment < _segments.Count)
        {
            var seg = _segments[_segment++];
            switch (seg.Kind)
            {
                case JinjaSegmentKind.Text:
                    nodes.Add(new TextNode(seg.Text, seg.Line));
                    break;
                case JinjaSegmentKind.Output:
                    Begin(seg);
                    nodes.Add(new OutputNode(ParseExpression(), seg.Line));
                    ExpectEnd();
                    break;
                default:
                    Begin(seg);
                    var word = Next();
                    if (word.Kind != JinjaTokenKind.Name)
                        throw Error(word, "a statement name");
                    if (stops.Contains(word.Text))
                    {
                        stop = word;
                        return nodes;
                    }
                    nodes.Add(ParseStatement(word));
                    break;
            }
        }
        stop = null;
        return nodes;
    }

    private JinjaNode ParseStatement(JinjaToken word)
    {
        switch (word.Text)
        {
            case "if": return ParseIf(word.Line);
            case "for": return ParseFor(word.Line);
            case "set": return ParseSet(word.Line);
            case "macro": return ParseMacro(word.Line);
            case "generation":
            {
                ExpectEnd();
                var body = ParseBody(["endgeneration"], out var stop);
                Close(stop, "generation", word.Line);
                return new GenerationNode(body, word.Line);
            }
            case "break" or "continue":
                ExpectEnd();
                return new LoopControlNode(word.Text == "break", word.Line);
        }
        if (Unsupported.Contains(word.Text))
            throw new JinjaNotSupportedException($"statement '{word.Text}'", $"Line {word.Line}: the chat template uses {{% {word.Text} %}}, which this Jinja interpreter does not support.");
        throw new JinjaTemplateException($"Line {word.Line}: unknown or misplaced statement {{% {word.Text} %}}.");
    }

    private IfNode ParseIf(int line)
    {
        var branches = new List<(JinjaExpr, List<JinjaNode>)>();
        var condition = ParseExpression();
        ExpectEnd();
        while (true)
        {
            var body = ParseBody(["elif", "else", "endif"], out var stop);
            branches.Add((condition, body));
            Close(stop, "if", line);
            switch (stop!.Value.Text)
            {
                case "elif":
                    condition = ParseExpression();
                    ExpectEnd();
                    continue;
                case "else":
                    ExpectEnd();
                    var elseBody = ParseBody(["endif"], out var end);
                    Close(end, "if", line);
                    ExpectEnd();
                    return new IfNode(branches, elseBody, line);
                default:
                    ExpectEnd();
                    return new IfNode(branches, null, line);
            }
        }
    }

    private ForNode ParseFor(int line)
    {
        var targets = new List<string> { ExpectName() };
        while (Accept(","))
            targets.Add(ExpectName());
        if (!Accept("in")) throw Error(Peek(), "'in'");
        var iterable = ParseConditional(allowBareIf: false);
        JinjaExpr? filter = null;
        if (Accept("if"))
            filter = ParseExpression();
        if (Peek().Is("recursive"))
            throw new JinjaNotSupportedException("recursive loops", $"Line {line}: the chat template uses a recursive for loop, which this Jinja interpreter does not support.");
        ExpectEnd();
        var body = ParseBody(["else", "endfor"], out var stop);
        Close(stop, "for", line);
        List<JinjaNode>? elseBody = null;
        if (stop!.Value.Text == "else")
        {
            ExpectEnd();
            elseBody = ParseBody(["endfor"], out var end);
            Close(end, "for", line);
        }
        ExpectEnd();
        return new ForNode(targets, iterable, filter, body, elseBody, line);
    }

    private SetNode ParseSet(int line)
    {
        var first = ExpectName();
        if (Accept("."))
        {
            var attr = ExpectName();
            Expect("=");
            var value = ParseExpression();
            ExpectEnd();
            return new SetNode([first], attr, value, null, line);
        }
        var targets = new List<string> { first };
        while (Accept(","))
            targets.Add(ExpectName());
        if (Accept("="))
        {
            var value = ParseTupleOrExpression();
            ExpectEnd();
            return new SetNode(targets, null, value, null, line);
        }
        if (Peek().Is("|"))
            throw new JinjaNotSupportedException("filtered block set", $"Line {line}: the chat template filters a {{% set %}} block, which this Jinja interpreter does not support.");
        ExpectEnd();
        var body = ParseBody(["endset"], out var stop);
        Close(stop, "set", line);
        ExpectEnd();
        return new SetNode(targets, null, null, body, line);
    }

    private MacroNode ParseMacro(int line)
    {
        var name = ExpectName();
        Expect("(");
        var parameters = new List<(string, JinjaExpr?)>();
        while (!Accept(")"))
        {
            if (parameters.Count > 0) Expect(",");
            if (Accept(")")) break;
            var p = ExpectName();
            parameters.Add((p, Accept("=") ? ParseExpression() : null));
        }
        ExpectEnd();
        var body = ParseBody(["endmacro"], out var stop);
        Close(stop, "macro", line);
        if (Peek().Kind == JinjaTokenKind.Name) Next();
        ExpectEnd();
        return new MacroNode(name, parameters, body, line);
    }

    private static void Close(JinjaToken? stop, string what, int line)
    {
        if (stop is null)
            throw new JinjaTemplateException($"Line {line}: {{% {what} %}} is never closed with {{% end{what} %}}.");
    }

    // ---- expressions (precedence as in Jinja's parser) ----

    private JinjaExpr ParseTupleOrExpression()
    {
        var first = ParseExpression();
        if (!Peek().Is(",")) return first;
        var items = new List<JinjaExpr> { first };
        while (Accept(","))
        {
            if (Peek().Kind == JinjaTokenKind.End) break;
            items.Add(ParseExpression());
        }
        return new ListExpr(items, IsTuple: true, first.Line);
    }

    private JinjaExpr ParseExpression() => ParseConditional(allowBareIf: true);

    private JinjaExpr ParseConditional(bool allowBareIf)
    {
        var expr = ParseOr();
        while (allowBareIf && Peek().Is("if"))
        {
            Next();
            var condition = ParseOr();
            JinjaExpr? otherwise = Accept("else") ? ParseConditional(allowBareIf: true) : null;
            expr = new ConditionalExpr(condition, expr, otherwise, expr.Line);
        }
        return expr;
    }

    private JinjaExpr ParseOr()
    {
        var left = ParseAnd();
        while (Accept("or"))
            left = new BinaryExpr("or", left, ParseAnd(), left.Line);
        return left;
    }

    private JinjaExpr ParseAnd()
    {
        var left = ParseNot();
        while (Accept("and"))
            left = new BinaryExpr("and", left, ParseNot(), left.Line);
        return left;
    }

    private JinjaExpr ParseNot()
    {
        if (Peek().Is("not"))
        {
            var t = Next();
            return new UnaryExpr("not", ParseNot(), t.Line);
        }
        return ParseCompare();
    }

    private JinjaExpr ParseCompare()
    {
        var first = ParseMath1();
        var rest = new List<(string, JinjaExpr)>();
        while (true)
        {
            var t = Peek();
            if (t.Kind == JinjaTokenKind.Operator && t.Text is "==" or "!=" or "<" or ">" or "<=" or ">=")
            {
                Next();
                rest.Add((t.Text, ParseMath1()));
            }
            else if (t.Is("in"))
            {
                Next();
                rest.Add(("in", ParseMath1()));
            }
            else if (t.Is("not") && PeekAt(1).Is("in"))
            {
                Next();
                Next();
                rest.Add(("not in", ParseMath1()));
            }
            else
            {
                break;
            }
        }
        return rest.Count == 0 ? first : new CompareExpr(first, rest, first.Line);
    }

    private JinjaExpr ParseMath1()
    {
        var left = ParseConcat();
        while (Peek().Kind == JinjaTokenKind.Operator && Peek().Text is "+" or "-")
        {
            var op = Next().Text;
            left = new BinaryExpr(op, left, ParseConcat(), left.Line);
        }
        return left;
    }

    private JinjaExpr ParseConcat()
    {
        var left = ParseMath2();
        while (Accept("~"))
            left = new BinaryExpr("~", left, ParseMath2(), left.Line);
        return left;
    }

    private JinjaExpr ParseMath2()
    {
        var left = ParsePow();
        while (Peek().Kind == JinjaTokenKind.Operator && Peek().Text is "*" or "/" or "//" or "%")
        {
            var op = Next().Text;
            left = new BinaryExpr(op, left, ParsePow(), left.Line);
        }
        return left;
    }

    private JinjaExpr ParsePow()
    {
        var left = ParseUnary();
        while (Accept("**"))
            left = new BinaryExpr("**", left, ParseUnary(), left.Line);
        return left;
    }

    private JinjaExpr ParseUnary()
    {
        var t = Peek();
        if (t.Kind == JinjaTokenKind.Operator && t.Text is "-" or "+")
        {
            Next();
            return new UnaryExpr(t.Text, ParseUnary(), t.Line);
        }
        return ParseFilterAndTest(ParsePostfix(ParsePrimary()));
    }

    private JinjaExpr ParsePrimary()
    {
        var t = Next();
        switch (t.Kind)
        {
            case JinjaTokenKind.String:
            {
                var text = t.Text;
                while (Peek().Kind == JinjaTokenKind.String) text += Next().Text; // adjacent literals concatenate
                return new LiteralExpr(text, t.Line);
            }
            case JinjaTokenKind.Integer:
                return new LiteralExpr(long.Parse(t.Text, CultureInfo.InvariantCulture), t.Line);
            case JinjaTokenKind.Float:
                return new LiteralExpr(double.Parse(t.Text, CultureInfo.InvariantCulture), t.Line);
            case JinjaTokenKind.Name:
                return t.Text switch
                {
                    "true" or "True" => new LiteralExpr(true, t.Line),
                    "false" or "False" => new LiteralExpr(false, t.Line),
                    "none" or "None" => new LiteralExpr(null, t.Line),
                    _ => new NameExpr(t.Text, t.Line),
                };
        }
        if (t.Is("("))
        {
            if (Accept(")")) return new ListExpr([], IsTuple: true, t.Line);
            var inner = ParseExpression();
            if (Peek().Is(","))
            {
                var items = new List<JinjaExpr> { inner };
                while (Accept(","))
                {
                    if (Peek().Is(")")) break;
                    items.Add(ParseExpression());
                }
                Expect(")");
                return new ListExpr(items, IsTuple: true, t.Line);
            }
            Expect(")");
            return inner;
        }
        if (t.Is("["))
        {
            var items = new List<JinjaExpr>();
            while (!Accept("]"))
            {
                if (items.Count > 0) { Expect(","); if (Accept("]")) break; }
                items.Add(ParseExpression());
            }
            return new ListExpr(items, IsTuple: false, t.Line);
        }
        if (t.Is("{"))
        {
            var items = new List<(JinjaExpr, JinjaExpr)>();
            while (!Accept("}"))
            {
                if (items.Count > 0) { Expect(","); if (Accept("}")) break; }
                var key = ParseExpression();
                Expect(":");
                items.Add((key, ParseExpression()));
            }
            return new DictExpr(items, t.Line);
        }
        throw Error(t, "a value");
    }

    private JinjaExpr ParsePostfix(JinjaExpr expr)
    {
        while (true)
        {
            var t = Peek();
            if (t.Is("."))
            {
                Next();
                var name = Next();
                if (name.Kind == JinjaTokenKind.Integer)
                    expr = new ItemExpr(expr, new LiteralExpr(long.Parse(name.Text, CultureInfo.InvariantCulture), name.Line), t.Line);
                else if (name.Kind == JinjaTokenKind.Name)
                    expr = new AttributeExpr(expr, name.Text, t.Line);
                else
                    throw Error(name, "an attribute name");
            }
            else if (t.Is("["))
            {
                Next();
                expr = ParseSubscript(expr, t.Line);
            }
            else if (t.Is("("))
            {
                Next();
                var (args, kwargs) = ParseArguments();
                expr = new CallExpr(expr, args, kwargs, t.Line);
            }
            else
            {
                return expr;
            }
        }
    }

    private JinjaExpr ParseSubscript(JinjaExpr target, int line)
    {
        JinjaExpr? start = null, stop = null, step = null;
        if (!Peek().Is(":"))
        {
            start = ParseExpression();
            if (Accept("]")) return new ItemExpr(target, start, line);
        }
        Expect(":");
        if (!Peek().Is(":") && !Peek().Is("]")) stop = ParseExpression();
        if (Accept(":") && !Peek().Is("]")) step = ParseExpression();
        Expect("]");
        return new SliceExpr(target, start, stop, step, line);
    }

    // After "(": positional and keyword arguments up to ")".
    private (List<JinjaExpr>, List<(string, JinjaExpr)>) ParseArguments()
    {
        var args = new List<JinjaExpr>();
        var kwargs = new List<(string, JinjaExpr)>();
        while (!Accept(")"))
        {
            if (args.Count + kwargs.Count > 0) { Expect(","); if (Accept(")")) break; }
            if (Peek().Kind == JinjaTokenKind.Name && PeekAt(1).Is("="))
            {
                var name = Next().Text;
                Next();
                kwargs.Add((name, ParseExpression()));
            }
            else
            {
                if (Peek().Is("*") || Peek().Is("**"))
                    throw new JinjaNotSupportedException("argument unpacking", $"Line {Peek().Line}: the chat template unpacks call arguments with * or **, which this Jinja interpreter does not support.");
                args.Add(ParseExpression());
            }
        }
        return (args, kwargs);
    }

    private JinjaExpr ParseFilterAndTest(JinjaExpr expr)
    {
        while (true)
        {
            if (Accept("|"))
            {
                var name = ExpectName();
                List<JinjaExpr> args = [];
                List<(string, JinjaExpr)> kwargs = [];
                if (Accept("(")) (args, kwargs) = ParseArguments();
                expr = new FilterExpr(expr, name, args, kwargs, expr.Line);
                expr = ParsePostfix(expr);
            }
            else if (Peek().Is("is"))
            {
                Next();
                bool negated = Accept("not");
                var name = ExpectName();
                List<JinjaExpr> args = [];
                if (Accept("("))
                {
                    (args, var kwargs) = ParseArguments();
                    if (kwargs.Count > 0) throw new JinjaTemplateException($"Line {expr.Line}: test '{name}' takes no keyword arguments.");
                }
                else if (StartsValue(Peek()) && !Peek().Is("and") && !Peek().Is("or") && !Peek().Is("else") && !Peek().Is("if") && !Peek().Is("in") && !Peek().Is("is") && !Peek().Is("not"))
                {
                    args = [ParsePostfix(ParsePrimary())];
                }
                expr = new TestExpr(expr, name, args, negated, expr.Line);
            }
            else
            {
                return expr;
            }
        }
    }

    private static bool StartsValue(JinjaToken t) =>
        t.Kind is JinjaTokenKind.Name or JinjaTokenKind.String or JinjaTokenKind.Integer or JinjaTokenKind.Float || t.Is("(") || t.Is("[") || t.Is("{");

    // ---- token helpers ----

    private void Begin(JinjaSegment seg)
    {
        _tokens = seg.Tokens;
        _pos = 0;
    }

    private JinjaToken Peek() => PeekAt(0);

    private JinjaToken PeekAt(int offset) =>
        _pos + offset < _tokens.Count ? _tokens[_pos + offset] : new JinjaToken(JinjaTokenKind.End, "", _tokens.Count > 0 ? _tokens[^1].Line : 0);

    private JinjaToken Next()
    {
        var t = Peek();
        if (t.Kind != JinjaTokenKind.End) _pos++;
        return t;
    }

    private bool Accept(string op)
    {
        if (!Peek().Is(op)) return false;
        _pos++;
        return true;
    }

    private void Expect(string op)
    {
        if (!Accept(op)) throw Error(Peek(), $"'{op}'");
    }

    private string ExpectName()
    {
        var t = Next();
        return t.Kind == JinjaTokenKind.Name ? t.Text : throw Error(t, "a name");
    }

    private void ExpectEnd()
    {
        if (Peek().Kind != JinjaTokenKind.End) throw Error(Peek(), "the end of the tag");
    }

    private static JinjaTemplateException Error(JinjaToken t, string expected) =>
        new($"Line {t.Line}: expected {expected}, found {t}.");
}
