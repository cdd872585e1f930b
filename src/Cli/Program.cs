namespace QLora.Cli;

/// <summary>Entry point of the <c>qlora</c> command.</summary>
public static class Program
{
    /// <summary>Runs one verb and returns the process exit code.</summary>
    public static int Main(string[] args)
    {
        Console.Error.WriteLine("qlora: no verbs yet");
        return args.Length == 0 ? 1 : 2;
    }
}
