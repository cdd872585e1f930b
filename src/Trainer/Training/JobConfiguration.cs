using System.ComponentModel;
using System.Globalization;
using System.Reflection;
using Microsoft.Extensions.Configuration;

namespace QLora.Trainer;

/// <summary>
/// Reads a job: the JSON file, then <c>QLORA_</c>-prefixed environment variables (<c>QLORA_Training__LearningRate</c>),
/// then command-line overrides (<c>--Training:LearningRate 1e-4</c>), later sources winning, as
/// Microsoft.Extensions.Configuration layers them. Every key is checked against the options type before binding, so an
/// unknown key, a value of the wrong type or an out-of-range value stops the job with a message naming the key, the
/// value and what is allowed. Relative paths are resolved against the job file's folder.
/// </summary>
public static class JobConfiguration
{
    /// <summary>The environment-variable prefix.</summary>
    public const string EnvironmentPrefix = "QLORA_";

    /// <summary>
    /// <c>QLORA_</c> variables that configure the process, not the job (the libtorch preload, the GPU check, MPI): never
    /// read as job keys, so setting them does not make every job fail with an unknown key.
    /// </summary>
    public static readonly IReadOnlyList<string> ProcessVariables = ["QLORA_LIBTORCH", "QLORA_LIBTORCH_ALLOW_MISMATCH", "QLORA_CUDART", "QLORA_GPU_CHECK", "QLORA_MPI_LIBRARY"];

    /// <summary>Top-level sections that belong to other verbs and are allowed in the same file (e.g. <c>Quantize</c>).</summary>
    public static readonly IReadOnlyList<string> OtherVerbSections = ["Quantize"];

    /// <summary>
    /// Builds the layered configuration. <paramref name="jsonPath"/> must exist; <paramref name="overrides"/> are
    /// command-line tokens (<c>--Section:Key value</c> or <c>--Section:Key=value</c>).
    /// </summary>
    public static IConfigurationRoot Build(string jsonPath, IEnumerable<string>? overrides = null, bool environment = true)
    {
        var full = Path.GetFullPath(jsonPath);
        if (!File.Exists(full)) throw new FileNotFoundException($"job file {full} does not exist; pass --config <job.json> or run from a folder with appsettings.json");
        var builder = new ConfigurationBuilder();
        builder.AddJsonFile(full, optional: false, reloadOnChange: false);
        if (environment) builder.AddInMemoryCollection(EnvironmentOverrides());
        var args = overrides?.ToArray() ?? [];
        for (int i = 0; i < args.Length; i++)
        {
            var a = args[i];
            if (!a.StartsWith("--", StringComparison.Ordinal) || !a.Contains(':'))
                throw new FormatException($"override '{a}' is not of the form --Section:Key value (e.g. --Training:LearningRate 1e-4)");
            if (!a.Contains('='))
            {
                if (i + 1 >= args.Length) throw new FormatException($"override '{a}' has no value (e.g. --Training:LearningRate 1e-4)");
                i++; // its value, which may start with '-'
            }
        }
        builder.AddCommandLine(args);
        try
        {
            return builder.Build();
        }
        catch (Exception e) when (e is FormatException or InvalidDataException)
        {
            throw new FormatException($"{full}: not valid JSON{JsonPosition(full)}");
        }
    }

    /// <summary>
    /// The job keys set through the environment: <c>QLORA_&lt;Section&gt;__&lt;Key&gt;</c> (<c>QLORA_Training__LearningRate</c>).
    /// A <c>QLORA_</c> variable without a <c>__</c> (<c>QLORA_HOME</c>, <c>QLORA_CUDART</c>: a tool's own settings) is
    /// not a job key and is not read as one; one of the key form with a misspelt section is read, so that it is reported.
    /// </summary>
    public static IReadOnlyDictionary<string, string?> EnvironmentOverrides()
    {
        var result = new Dictionary<string, string?>(StringComparer.OrdinalIgnoreCase);
        foreach (System.Collections.DictionaryEntry e in Environment.GetEnvironmentVariables())
        {
            var name = (string)e.Key;
            if (!name.StartsWith(EnvironmentPrefix, StringComparison.OrdinalIgnoreCase)) continue;
            if (ProcessVariables.Contains(name, StringComparer.OrdinalIgnoreCase)) continue;
            var key = name[EnvironmentPrefix.Length..].Replace("__", ":", StringComparison.Ordinal);
            int colon = key.IndexOf(':', StringComparison.Ordinal);
            if (colon <= 0) continue;
            result[key] = (string?)e.Value;
        }
        return result;
    }

    // Where the JSON parser stopped, as " at line L, column C: reason" (1-based), or "" when it cannot be told.
    static string JsonPosition(string path)
    {
        try
        {
            using var doc = System.Text.Json.JsonDocument.Parse(File.ReadAllBytes(path),
                new System.Text.Json.JsonDocumentOptions { CommentHandling = System.Text.Json.JsonCommentHandling.Skip, AllowTrailingCommas = true });
            return "";
        }
        catch (System.Text.Json.JsonException j) when (j.LineNumber is long line)
        {
            var reason = j.Message;
            int cut = reason.IndexOf(" LineNumber:", StringComparison.Ordinal);
            if (cut > 0) reason = reason[..cut];
            return $" at line {line + 1}, column {(j.BytePositionInLine ?? 0) + 1}: {reason.TrimEnd('.', ' ')}";
        }
    }

    /// <summary>
    /// Binds and validates a <see cref="TrainJob"/> from <paramref name="jsonPath"/> plus environment and command-line overrides.
    /// </summary>
    /// <exception cref="FormatException">An unknown key, a wrong type or an invalid value (all problems, in one message).</exception>
    /// <param name="jsonPath">The job file.</param>
    /// <param name="overrides">--Section:Key value pairs.</param>
    /// <param name="environment">Read QLORA_ variables.</param>
    /// <param name="unused">Keys the caller does not use (qlora eval: Data:TrainFile, Output:Dir), not required.</param>
    public static TrainJob LoadTrainJob(string jsonPath, IEnumerable<string>? overrides = null, bool environment = true, IReadOnlyList<string>? unused = null)
    {
        var config = Build(jsonPath, overrides, environment);
        var env = environment ? EnvironmentOverrides().Keys.Select(k => EnvironmentPrefix + k.Replace(":", "__", StringComparison.Ordinal)).ToList() : [];
        string Sources() => env.Count == 0 ? "" : $" (also read from the environment: {string.Join(", ", env)})";
        TrainJob job;
        try { job = Bind<TrainJob>(config, Path.GetFullPath(jsonPath), OtherVerbSections); }
        catch (FormatException e) when (env.Count > 0) { throw new FormatException(e.Message + Sources(), e); }
        // An empty value unsets an optional setting (--Data:EvalFile "" removes the job file's eval file).
        if (string.IsNullOrWhiteSpace(job.Data.EvalFile)) job.Data.EvalFile = null;
        if (string.IsNullOrWhiteSpace(job.Model.ChatTemplate)) job.Model.ChatTemplate = null;
        if (string.IsNullOrWhiteSpace(job.Eval.ChoicesFile)) job.Eval.ChoicesFile = null;
        var problems = job.Validate().Where(p => unused?.Any(k => p.StartsWith(k + " = ", StringComparison.Ordinal)) != true).ToList();
        if (problems.Count > 0) throw new FormatException($"{Path.GetFullPath(jsonPath)}: {string.Join("; ", problems)}{Sources()}");
        var dir = Path.GetDirectoryName(Path.GetFullPath(jsonPath))!;
        job.Model.Path = Resolve(dir, job.Model.Path);
        job.Data.TrainFile = Resolve(dir, job.Data.TrainFile);
        job.Data.EvalFile = Resolve(dir, job.Data.EvalFile);
        job.Output.Dir = Resolve(dir, job.Output.Dir);
        job.Eval.ChoicesFile = Resolve(dir, job.Eval.ChoicesFile);
        return job;
    }

    static string? Resolve(string dir, string? path) => string.IsNullOrWhiteSpace(path) ? path : Path.GetFullPath(Path.Combine(dir, path));

    /// <summary>
    /// Binds <typeparamref name="T"/> from the root of <paramref name="config"/> after checking every key and leaf value
    /// against it. <paramref name="source"/> names the job in messages; <paramref name="ignoredSections"/> are top-level
    /// sections that other verbs own.
    /// </summary>
    public static T Bind<T>(IConfiguration config, string source, IReadOnlyList<string>? ignoredSections = null) where T : new()
    {
        var errors = new List<string>();
        foreach (var child in config.GetChildren())
        {
            if (ignoredSections?.Contains(child.Key, StringComparer.OrdinalIgnoreCase) == true) continue;
            Check(child, typeof(T), errors);
        }
        if (errors.Count > 0) throw new FormatException($"{source}: {string.Join("; ", errors)}");
        var result = new T();
        foreach (var child in config.GetChildren())
        {
            if (ignoredSections?.Contains(child.Key, StringComparer.OrdinalIgnoreCase) == true) continue;
            var prop = Property(typeof(T), child.Key)!;
            if (prop.GetValue(result) is { } existing && !prop.PropertyType.IsValueType && prop.PropertyType != typeof(string)) child.Bind(existing, o => o.ErrorOnUnknownConfiguration = true);
            else prop.SetValue(result, child.Get(prop.PropertyType, o => o.ErrorOnUnknownConfiguration = true));
        }
        return result;
    }

    /// <summary>
    /// Binds section <paramref name="section"/> of <paramref name="config"/> to a new <typeparamref name="T"/> after
    /// checking its keys and leaf values against it (other sections are not looked at): how a verb reads its own section
    /// of a shared job file.
    /// </summary>
    public static T BindSection<T>(IConfiguration config, string section, string source) where T : new()
    {
        var errors = new List<string>();
        var s = config.GetSection(section);
        foreach (var child in s.GetChildren()) Check(child, typeof(T), errors);
        if (errors.Count > 0) throw new FormatException($"{source}: {string.Join("; ", errors)}");
        var result = new T();
        s.Bind(result, o => o.ErrorOnUnknownConfiguration = true);
        return result;
    }

    static PropertyInfo? Property(Type type, string key) =>
        type.GetProperties(BindingFlags.Public | BindingFlags.Instance)
            .FirstOrDefault(p => p.CanWrite && p.GetCustomAttribute<System.Text.Json.Serialization.JsonIgnoreAttribute>() is null
                && string.Equals(p.Name, key, StringComparison.OrdinalIgnoreCase));

    static void Check(IConfigurationSection section, Type owner, List<string> errors)
    {
        var prop = Property(owner, section.Key);
        if (prop is null)
        {
            var allowed = owner.GetProperties(BindingFlags.Public | BindingFlags.Instance)
                .Where(p => p.CanWrite && p.GetCustomAttribute<System.Text.Json.Serialization.JsonIgnoreAttribute>() is null).Select(p => p.Name);
            var where = section.Path.Contains(':') ? section.Path[..section.Path.LastIndexOf(':')] : "the job";
            errors.Add($"unknown key {section.Path}; allowed keys in {where} are {string.Join(", ", allowed)}");
            return;
        }
        CheckValue(section, prop.PropertyType, errors);
    }

    static void CheckValue(IConfigurationSection section, Type type, List<string> errors)
    {
        var inner = Nullable.GetUnderlyingType(type) ?? type;
        if (IsList(inner, out var element))
        {
            if (section.Value is { Length: > 0 } single)
            {
                errors.Add($"{section.Path} = '{single}': a JSON array is required");
                return;
            }
            foreach (var item in section.GetChildren())
            {
                if (!int.TryParse(item.Key, NumberStyles.None, CultureInfo.InvariantCulture, out _))
                    errors.Add($"{item.Path}: {section.Path} is a list; '{item.Key}' is not an index");
                else CheckValue(item, element, errors);
            }
            return;
        }
        if (IsDictionary(inner, out var valueType))
        {
            if (section.Value is { Length: > 0 } single)
            {
                errors.Add($"{section.Path} = '{single}': a JSON object is required");
                return;
            }
            foreach (var item in section.GetChildren()) CheckValue(item, valueType, errors);
            return;
        }
        if (inner == typeof(string) || inner.IsPrimitive || inner == typeof(decimal))
        {
            if (section.Value is null)
            {
                if (section.GetChildren().Any()) errors.Add($"{section.Path}: a single value ({Describe(inner)}) is required, not an object");
                return;
            }
            if (inner == typeof(string)) return;
            var converter = TypeDescriptor.GetConverter(inner);
            bool ok;
            try { ok = converter.ConvertFromInvariantString(section.Value) is not null; }
            catch (Exception e) when (e is FormatException or NotSupportedException or ArgumentException or OverflowException) { ok = false; }
            if (ok && (inner == typeof(double) || inner == typeof(float)) && !double.IsFinite(double.Parse(section.Value, CultureInfo.InvariantCulture))) ok = false;
            if (!ok) errors.Add($"{section.Path} = '{section.Value}': {Describe(inner)} required");
            return;
        }
        // A nested section.
        if (section.Value is not null)
        {
            errors.Add($"{section.Path} = '{section.Value}': a section (JSON object) is required");
            return;
        }
        foreach (var child in section.GetChildren()) Check(child, inner, errors);
    }

    static bool IsList(Type t, out Type element)
    {
        if (t.IsGenericType && t.GetGenericTypeDefinition() == typeof(List<>))
        {
            element = t.GetGenericArguments()[0];
            return true;
        }
        element = typeof(void);
        return false;
    }

    static bool IsDictionary(Type t, out Type value)
    {
        if (t.IsGenericType && t.GetGenericTypeDefinition() == typeof(Dictionary<,>) && t.GetGenericArguments()[0] == typeof(string))
        {
            value = t.GetGenericArguments()[1];
            return true;
        }
        value = typeof(void);
        return false;
    }

    static string Describe(Type t) => t == typeof(bool) ? "true or false"
        : t == typeof(int) ? "an integer"
        : t == typeof(long) ? "an integer"
        : t == typeof(double) || t == typeof(float) ? "a finite number"
        : t.Name;
}
