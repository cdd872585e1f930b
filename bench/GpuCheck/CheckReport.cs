using System.Text.Json.Nodes;

namespace QLora.GpuCheck;

/// <summary>The outcome of one check.</summary>
internal enum Outcome
{
    Pass,
    Fail,
    Skip,
    /// <summary>An observation that documents behaviour without passing or failing anything.</summary>
    Info,
}

/// <summary>The table of checks the app prints, and the figures it ends with as one JSON line.</summary>
internal sealed class CheckReport
{
    private readonly List<(string Name, Outcome Outcome, string Detail)> _rows = [];

    /// <summary>Figures for the final JSON line.</summary>
    public JsonObject Figures { get; } = new();

    /// <summary>True when no check failed.</summary>
    public bool AllPassed => _rows.All(r => r.Outcome != Outcome.Fail);

    /// <summary>Records a check and echoes it.</summary>
    public void Add(string name, Outcome outcome, string detail)
    {
        _rows.Add((name, outcome, detail));
        Console.WriteLine($"[{outcome.ToString().ToUpperInvariant()}] {name}: {detail}");
    }

    /// <summary>Runs <paramref name="check"/>, recording any exception as a failure of <paramref name="name"/>.</summary>
    public void Run(string name, Action check)
    {
        try
        {
            check();
        }
        catch (Exception e)
        {
            Add(name, Outcome.Fail, $"{e.GetType().Name}: {e.Message}");
        }
    }

    /// <summary>Prints the table and the JSON line.</summary>
    public void Print()
    {
        int width = Math.Max(10, _rows.Count == 0 ? 0 : _rows.Max(r => r.Name.Length));
        Console.WriteLine();
        Console.WriteLine($"{"check".PadRight(width)}  result  detail");
        Console.WriteLine($"{new string('-', width)}  ------  ------");
        foreach (var (name, outcome, detail) in _rows)
            Console.WriteLine($"{name.PadRight(width)}  {outcome.ToString().ToUpperInvariant(),-6}  {detail}");
        var checks = new JsonObject();
        foreach (var (name, outcome, _) in _rows) checks[name] = outcome.ToString().ToLowerInvariant();
        Figures["checks"] = checks;
        Figures["passed"] = AllPassed;
        Console.WriteLine();
        Console.WriteLine(Figures.ToJsonString());
    }
}
