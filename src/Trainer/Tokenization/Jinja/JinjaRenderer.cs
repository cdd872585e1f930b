using System.Text;

namespace QLora.Trainer;

/// <summary>Evaluates parsed nodes against variables: Jinja's scoping (loops and macros open scopes, if does not), loop controls, output capture.</summary>
internal sealed class JinjaRenderer
{
    private readonly JinjaGlobals _globals;
    private readonly List<StringBuilder> _outputs = [new()];

    public JinjaRenderer(JinjaGlobals globals) => _globals = globals;

    /// <summary>Character spans of the main output written inside {% generation %} blocks.</summary>
    public List<CharSpan> GenerationSpans { get; } = [];

    public string Render(List<JinjaNode> nodes, Scope scope)
    {
        if (RenderNodes(nodes, scope) != Flow.Normal)
            throw new JinjaTemplateException("{% break %} or {% continue %} outside a loop.");
        return _outputs[0].ToString();
    }

    internal sealed class Scope(Scope? parent)
    {
        private readonly Dictionary<string, object?> _vars = new(StringComparer.Ordinal);

        public Scope? Parent { get; } = parent;

        public bool TryGet(string name, out object? value)
        {
            for (var s = this; s is not null; s = s.Parent)
            {
                if (s._vars.TryGetValue(name, out value)) return true;
            }
            value = null;
            return false;
        }

        public void Set(string name, object? value) => _vars[name] = value;
    }

    private enum Flow { Normal, Break, Continue }

    private StringBuilder Out => _outputs[^1];

    private Flow RenderNodes(List<JinjaNode> nodes, Scope scope)
    {
        foreach (var node in nodes)
        {
            var flow = RenderNode(node, scope);
            if (flow != Flow.Normal) return flow;
        }
        return Flow.Normal;
    }

    private Flow RenderNode(JinjaNode node, Scope scope)
    {
        switch (node)
        {
            case TextNode t:
                Out.Append(t.Text);
                return Flow.Normal;
            case OutputNode o:
                Out.Append(Py.Str(Eval(o.Value, scope)));
                return Flow.Normal;
            case IfNode i:
                foreach (var (condition, body) in i.Branches)
                {
                    if (Py.Truthy(Eval(condition, scope))) return RenderNodes(body, scope);
                }
                return i.Else is null ? Flow.Normal : RenderNodes(i.Else, scope);
            case ForNode f:
                RenderFor(f, scope);
                return Flow.Normal;
            case SetNode s:
                RenderSet(s, scope);
                return Flow.Normal;
            case MacroNode m:
                scope.Set(m.Name, MakeMacro(m, scope));
                return Flow.Normal;
            case GenerationNode g:
            {
                bool main = _outputs.Count == 1;
                int start = Out.Length;
                var flow = RenderNodes(g.Body, scope);
                if (main) GenerationSpans.Add(new CharSpan(start, Out.Length - start));
                return flow;
            }
            case LoopControlNode c:
                return c.IsBreak ? Flow.Break : Flow.Continue;
            default:
                throw new JinjaTemplateException($"Line {node.Line}: unknown node.");
        }
    }

    private void RenderFor(ForNode f, Scope scope)
    {
        var all = Py.Iterate(Eval(f.Iterable, scope));
        var loopScope = new Scope(scope);
        List<object?> items = all;
        if (f.Filter is not null)
        {
            items = [];
            foreach (var item in all)
            {
                Bind(f.Targets, item, loopScope, f.Line);
                if (Py.Truthy(Eval(f.Filter, loopScope))) items.Add(item);
            }
        }
        if (items.Count == 0)
        {
            if (f.Else is not null) RenderNodes(f.Else, scope);
            return;
        }
        var loop = new JinjaLoop(items);
        loopScope.Set("loop", loop);
        for (int i = 0; i < items.Count; i++)
        {
            loop.Index0 = i;
            Bind(f.Targets, items[i], loopScope, f.Line);
            if (RenderNodes(f.Body, loopScope) == Flow.Break) break;
        }
    }

    private static void Bind(List<string> targets, object? value, Scope scope, int line)
    {
        if (targets.Count == 1)
        {
            scope.Set(targets[0], value);
            return;
        }
        var parts = Py.AsSequence(value) ?? (value is string ? Py.Iterate(value) : null);
        if (parts is null || parts.Count != targets.Count)
            throw new JinjaTemplateException($"Line {line}: cannot unpack {Py.TypeName(value)} into {targets.Count} names ({string.Join(", ", targets)}).");
        for (int i = 0; i < targets.Count; i++)
            scope.Set(targets[i], parts[i]);
    }

    private void RenderSet(SetNode s, Scope scope)
    {
        object? value;
        if (s.Value is null)
        {
            _outputs.Add(new StringBuilder());
            try
            {
                RenderNodes(s.Body!, new Scope(scope));
                value = Out.ToString();
            }
            finally
            {
                _outputs.RemoveAt(_outputs.Count - 1);
            }
        }
        else
        {
            value = Eval(s.Value, scope);
        }
        if (s.NamespaceAttribute is { } attr)
        {
            if (!scope.TryGet(s.Targets[0], out var target) || target is not JinjaNamespace ns)
                throw new JinjaTemplateException($"Line {s.Line}: {{% set {s.Targets[0]}.{attr} %}} needs '{s.Targets[0]}' to be a namespace().");
            ns.Attributes[attr] = value;
            return;
        }
        Bind(s.Targets, value, scope, s.Line);
    }

    private JinjaCallable MakeMacro(MacroNode m, Scope definition) => new(m.Name, (args, kwargs) =>
    {
        if (args.Count > m.Parameters.Count)
            throw new JinjaTemplateException($"macro '{m.Name}' takes {m.Parameters.Count} arguments, {args.Count} given.");
        var scope = new Scope(definition);
        for (int i = 0; i < m.Parameters.Count; i++)
        {
            var (name, fallback) = m.Parameters[i];
            object? value = i < args.Count ? args[i]
                : kwargs.Remove(name, out var kw) ? kw
                : fallback is not null ? Eval(fallback, scope) : new JinjaUndefined(name);
            scope.Set(name, value);
        }
        if (kwargs.Count > 0)
            throw new JinjaTemplateException($"macro '{m.Name}' has no parameter '{kwargs.Keys.First()}'.");
        _outputs.Add(new StringBuilder());
        try
        {
            RenderNodes(m.Body, scope);
            return Out.ToString();
        }
        finally
        {
            _outputs.RemoveAt(_outputs.Count - 1);
        }
    });

    // ---- expressions ----

    public object? Eval(JinjaExpr e, Scope scope)
    {
        switch (e)
        {
            case LiteralExpr l:
                return l.Value;
            case NameExpr n:
                return scope.TryGet(n.Name, out var v) ? v : _globals.TryGet(n.Name, out var g) ? g : new JinjaUndefined(n.Name);
            case ListExpr l:
            {
                var items = l.Items.Select(x => Eval(x, scope)).ToList();
                return l.IsTuple ? items.ToArray() : items;
            }
            case DictExpr d:
            {
                var dict = new OrderedDictionary<string, object?>(StringComparer.Ordinal);
                foreach (var (k, val) in d.Items)
                    dict[Eval(k, scope) as string ?? throw new JinjaTemplateException($"Line {d.Line}: dictionary keys must be strings here.")] = Eval(val, scope);
                return dict;
            }
            case AttributeExpr a:
                return JinjaMembers.GetAttribute(Eval(a.Target, scope), a.Name, Describe(a.Target), a.Line);
            case ItemExpr i:
                return JinjaMembers.GetItem(Eval(i.Target, scope), Eval(i.Index, scope), Describe(i.Target), i.Line);
            case SliceExpr s:
                return JinjaMembers.Slice(Eval(s.Target, scope), Optional(s.Start, scope), Optional(s.Stop, scope), Optional(s.Step, scope), s.Line);
            case CallExpr c:
            {
                var callee = Eval(c.Callee, scope);
                var (args, kwargs) = Arguments(c.Args, c.Kwargs, scope);
                if (callee is JinjaCallable f) return f.Invoke(args, kwargs);
                if (callee is JinjaUndefined u)
                    throw new JinjaNotSupportedException($"function '{u.Name}'", $"Line {c.Line}: the chat template calls '{u.Name}', which is neither passed to the template nor a function this Jinja interpreter provides.");
                throw new JinjaTemplateException($"Line {c.Line}: {Py.TypeName(callee)} is not callable.");
            }
            case FilterExpr f:
            {
                var target = Eval(f.Target, scope);
                var (args, kwargs) = Arguments(f.Args, f.Kwargs, scope);
                return JinjaFilters.Apply(f.Name, target, args, kwargs, f.Line, this);
            }
            case TestExpr t:
            {
                var target = Eval(t.Target, scope);
                var args = t.Args.Select(x => Eval(x, scope)).ToList();
                return JinjaFilters.Test(t.Name, target, args, t.Line, this) != t.Negated;
            }
            case UnaryExpr u:
            {
                var operand = Eval(u.Operand, scope);
                return u.Op switch
                {
                    "not" => !Py.Truthy(operand),
                    "-" => operand is long or bool ? (object)(-Py.ToLong(operand)) : -Py.ToDouble(operand),
                    _ => Py.IsNumber(operand) ? operand : throw Py.TypeError("a number", operand),
                };
            }
            case BinaryExpr b:
                return EvalBinary(b, scope);
            case CompareExpr c:
            {
                var left = Eval(c.First, scope);
                foreach (var (op, operandExpr) in c.Rest)
                {
                    var right = Eval(operandExpr, scope);
                    bool ok = op switch
                    {
                        "==" => Py.Equals(left, right),
                        "!=" => !Py.Equals(left, right),
                        "<" => Py.Compare(left, right) < 0,
                        ">" => Py.Compare(left, right) > 0,
                        "<=" => Py.Compare(left, right) <= 0,
                        ">=" => Py.Compare(left, right) >= 0,
                        "in" => Py.Contains(right, left),
                        _ => !Py.Contains(right, left),
                    };
                    if (!ok) return false;
                    left = right;
                }
                return true;
            }
            case ConditionalExpr c:
                return Py.Truthy(Eval(c.Condition, scope)) ? Eval(c.Then, scope) : c.Else is null ? new JinjaUndefined("else") : Eval(c.Else, scope);
            default:
                throw new JinjaTemplateException($"Line {e.Line}: unknown expression.");
        }
    }

    private object? Optional(JinjaExpr? e, Scope scope) => e is null ? null : Eval(e, scope);

    private (List<object?>, Dictionary<string, object?>) Arguments(List<JinjaExpr> args, List<(string Name, JinjaExpr Value)> kwargs, Scope scope)
    {
        var values = args.Select(x => Eval(x, scope)).ToList();
        var named = new Dictionary<string, object?>(StringComparer.Ordinal);
        foreach (var (name, value) in kwargs)
            named[name] = Eval(value, scope);
        return (values, named);
    }

    private static string Describe(JinjaExpr e) => e switch
    {
        NameExpr n => n.Name,
        AttributeExpr a => Describe(a.Target) + "." + a.Name,
        ItemExpr { Index: LiteralExpr l } i => Describe(i.Target) + "[" + Py.Repr(l.Value) + "]",
        ItemExpr i => Describe(i.Target) + "[…]",
        _ => "value",
    };

    private object? EvalBinary(BinaryExpr b, Scope scope)
    {
        if (b.Op == "and")
        {
            var l = Eval(b.Left, scope);
            return Py.Truthy(l) ? Eval(b.Right, scope) : l;
        }
        if (b.Op == "or")
        {
            var l = Eval(b.Left, scope);
            return Py.Truthy(l) ? l : Eval(b.Right, scope);
        }
        var left = Eval(b.Left, scope);
        var right = Eval(b.Right, scope);
        if (b.Op == "~") return Py.Str(left) + Py.Str(right);
        if (left is JinjaUndefined || right is JinjaUndefined)
            throw new JinjaTemplateException($"Line {b.Line}: '{(left as JinjaUndefined ?? (JinjaUndefined)right!).Name}' is undefined.");
        switch (b.Op)
        {
            case "+":
                if (left is string ls && right is string rs) return ls + rs;
                if (left is List<object?> ll && right is List<object?> rl) return (List<object?>)[.. ll, .. rl];
                if (left is object?[] lt && right is object?[] rt) return (object?[])[.. lt, .. rt];
                break;
            case "*":
                if (left is string s1 && right is long n1) return string.Concat(Enumerable.Repeat(s1, (int)Math.Max(0, n1)));
                if (left is List<object?> l1 && right is long n2) return Enumerable.Repeat(l1, (int)Math.Max(0, n2)).SelectMany(x => x).ToList();
                break;
        }
        if (!Py.IsNumber(left) || !Py.IsNumber(right))
            throw new JinjaTemplateException($"Line {b.Line}: unsupported operand types for {b.Op}: {Py.TypeName(left)} and {Py.TypeName(right)}.");
        bool integral = left is not double && right is not double;
        switch (b.Op)
        {
            case "+": return integral ? (object)(Py.ToLong(left) + Py.ToLong(right)) : Py.ToDouble(left) + Py.ToDouble(right);
            case "-": return integral ? (object)(Py.ToLong(left) - Py.ToLong(right)) : Py.ToDouble(left) - Py.ToDouble(right);
            case "*": return integral ? (object)(Py.ToLong(left) * Py.ToLong(right)) : Py.ToDouble(left) * Py.ToDouble(right);
            case "/":
                if (Py.ToDouble(right) == 0) throw new JinjaTemplateException($"Line {b.Line}: division by zero.");
                return Py.ToDouble(left) / Py.ToDouble(right);
            case "//":
                if (Py.ToDouble(right) == 0) throw new JinjaTemplateException($"Line {b.Line}: division by zero.");
                if (integral) return FloorDiv(Py.ToLong(left), Py.ToLong(right));
                return Math.Floor(Py.ToDouble(left) / Py.ToDouble(right));
            case "%":
                if (Py.ToDouble(right) == 0) throw new JinjaTemplateException($"Line {b.Line}: modulo by zero.");
                if (integral)
                {
                    long a = Py.ToLong(left), m = Py.ToLong(right);
                    return a - m * FloorDiv(a, m);
                }
                double x = Py.ToDouble(left), y = Py.ToDouble(right);
                return x - y * Math.Floor(x / y);
            default: // **
                if (integral && Py.ToLong(right) >= 0) return (long)Math.Pow(Py.ToLong(left), Py.ToLong(right));
                return Math.Pow(Py.ToDouble(left), Py.ToDouble(right));
        }
    }

    private static long FloorDiv(long a, long b)
    {
        long q = a / b;
        return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
    }
}
