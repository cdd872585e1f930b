using System.Text.Json.Nodes;

namespace QLora.Trainer.Tests;

/// <summary>The Jinja interpreter against outputs worked out by hand from Jinja's rules as transformers configures them.</summary>
public sealed class JinjaTemplateTests
{
    private static string Render(string source, JsonObject? variables = null)
    {
        var vars = new Dictionary<string, JsonNode?>();
        foreach (var (k, v) in variables ?? []) vars[k] = v?.DeepClone();
        return JinjaTemplate.Parse(source).Render(vars, new DateTime(2024, 12, 31, 23, 5, 9));
    }

    [Theory]
    // trim_blocks drops the newline after a block tag; lstrip_blocks drops the indentation before one; output tags keep both.
    [InlineData("{% if true %}\n  a\n{% endif %}\nb", "  a\nb")]
    [InlineData("  {% if true %}x{% endif %}", "x")]
    [InlineData("  {{ 'x' }}\n", "  x\n")]
    [InlineData("a  {%- if true -%}  b  {%- endif %}", "ab")]
    [InlineData("a\n  {%+ if true %}b{% endif +%}\nc", "a\n  b\nc")]
    [InlineData("{# note #}\nx", "x")]
    public void WhitespaceControlMatchesTransformersEnvironment(string source, string expected) => Assert.Equal(expected, Render(source));

    [Theory]
    [InlineData("{% for x in [1, 2, 3] %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop.revindex }}|{% endfor %}", "10TrueFalse33|21FalseFalse32|32FalseTrue31|")]
    [InlineData("{% for x in [1, 2, 3, 4] if x is even %}{{ x }}{{ ',' if not loop.last }}{% else %}none{% endfor %}", "2,4")]
    [InlineData("{% for x in [] %}{{ x }}{% else %}none{% endfor %}", "none")]
    [InlineData("{% for x in range(10) %}{% if x == 3 %}{% break %}{% endif %}{% if x == 1 %}{% continue %}{% endif %}{{ x }}{% endfor %}", "02")]
    [InlineData("{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }};{% endfor %}", "a=1;b=2;")]
    [InlineData("{% set x = 1 %}{% for i in [1] %}{% set x = 2 %}{% endfor %}{{ x }}", "1")]
    [InlineData("{% set ns = namespace(x=1) %}{% for i in [1, 2] %}{% set ns.x = ns.x + i %}{% endfor %}{{ ns.x }}", "4")]
    [InlineData("{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('A') }} {{ greet('B', punct='?') }}", "Hi A! Hi B?")]
    [InlineData("{% set block %}x{{ 1 + 1 }}{% endset %}[{{ block }}]", "[x2]")]
    public void StatementsBehaveAsInJinja(string source, string expected) => Assert.Equal(expected, Render(source));

    [Theory]
    [InlineData("{{ 'abcdef'[1:3] }}|{{ 'abc'[::-1] }}|{{ [1, 2, 3][-1] }}|{{ [1, 2, 3][:-1] }}", "bc|cba|3|[1, 2]")]
    [InlineData("{{ ' a b '.strip() }}|{{ 'x\\n\\n'.rstrip('\\n') }}|{{ 'a,b,,c'.split(',') }}|{{ ' a  b '.split() }}", "a b|x|['a', 'b', '', 'c']|['a', 'b']")]
    [InlineData("{{ 'Hello'.startswith('He') }}{{ 'Hello'.endswith(('x', 'lo')) }}{{ 'ell' in 'Hello' }}{{ 'z' not in 'Hello' }}", "TrueTrueTrueTrue")]
    [InlineData("{{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 2 ** 10 }} {{ 1 + 1.5 }}", "3 -4 1 2 3.5 1024 2.5")]
    [InlineData("{{ none }} {{ true }} {{ 1.0 }} {{ undefined_name }}|{{ 'a' ~ 1 ~ none }}", "None True 1.0 |a1None")]
    [InlineData("{{ [3, 1, 2] | sort | join(',') }} {{ 'ab' | upper }} {{ [1, 2] | length }} {{ x | default('d') }} {{ '  t ' | trim }}", "1,2,3 AB 2 d t")]
    [InlineData("{{ {'b': [1, 2.5, none, true], 'a': 'é\"\\n'} | tojson }}", "{\"b\": [1, 2.5, null, true], \"a\": \"é\\\"\\n\"}")]
    [InlineData("{{ {'a': [1]} | tojson(indent=2) }}", "{\n  \"a\": [\n    1\n  ]\n}")]
    [InlineData("{{ strftime_now('%d %b %Y %H:%M:%S %B %A') }}", "31 Dec 2024 23:05:09 December Tuesday")]
    [InlineData("{{ 'yes' if 1 > 2 else 'no' }} {{ 1 < 2 < 3 }} {{ not 0 and 2 or 3 }}", "no True 2")]
    [InlineData("{{ [{'r': 'u'}, {'r': 'a'}, {'r': 'u'}] | selectattr('r', 'equalto', 'u') | list | length }} {{ [{'n': 1}, {'n': 2}] | map(attribute='n') | list }}", "2 [1, 2]")]
    [InlineData("[{{ missing | trim }}] {{ 'a' in missing }} {{ missing | length }} {% for x in missing %}x{% endfor %}", "[] False 0 ")]
    [InlineData("{{ x is defined }} {{ none is none }} {{ 'a' is string }} {{ {} is mapping }} {{ 3 is odd }} {{ 4 is divisibleby 2 }}", "False True True True True True")]
    public void ExpressionsFollowPythonAndJinjaSemantics(string source, string expected) => Assert.Equal(expected, Render(source));

    [Fact]
    public void VariablesComeFromJsonWithTheirKeyOrder()
    {
        var output = Render("{% for m in messages %}{{ m.role }}:{{ m['content'] }}{{ m.missing is defined }};{% endfor %}{{ messages[0] }}",
            new JsonObject { ["messages"] = new JsonArray(new JsonObject { ["role"] = "user", ["content"] = "hi" }) });
        Assert.Equal("user:hiFalse;{'role': 'user', 'content': 'hi'}", output);
    }

    [Fact]
    public void ErrorsNameTheProblem()
    {
        Assert.Equal("boom", Assert.Throws<JinjaRaisedException>(() => Render("{{ raise_exception('boom') }}")).Message);
        Assert.Contains("'m' is undefined", Assert.Throws<JinjaTemplateException>(() => Render("{{ m.role }}")).Message);
        Assert.Equal("filter 'wordwrap'", Assert.Throws<JinjaNotSupportedException>(() => Render("{{ 'x' | wordwrap }}")).Construct);
        Assert.Equal("statement 'extends'", Assert.Throws<JinjaNotSupportedException>(() => Render("{% extends 'base' %}")).Construct);
        Assert.Contains("never closed", Assert.Throws<JinjaTemplateException>(() => Render("{% if true %}x")).Message);
        Assert.Contains("sandbox", Assert.Throws<JinjaTemplateException>(() => Render("{% set l = [] %}{{ l.append(1) }}")).Message);
    }
}
