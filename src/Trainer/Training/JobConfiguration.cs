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
        if (environment) builder.AddInMemoryCollection(EnvironmentKeys());
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
            throw new FormatException($"{full}: not valid JSON ({(e.InnerException ?? e).Message})");
        }
    }

    /// <summary>The job keys set through the environment: <c>QLORA_Section__Key</c> → <c>Section:Key</c>, the process variables left out.</summary>
    static IEnumerable<KeyValuePair<string, string?>> EnvironmentKeys()
    {
        foreach (System.Collections.DictionaryEntry e in Environment.GetEnvironmentVariables())
        {
            var name = (string)e.Key;
            if (!name.StartsWith(EnvironmentPrefix, StringComparison.OrdinalIgnoreCase)) continue;
            if (ProcessVariables.Contains(name, StringComparer.OrdinalIgnoreCase)) continue;
            yield return new(name[EnvironmentPrefix.Length..].Replace("__", ConfigurationPath.KeyDelimiter, StringComparison.Ordinal), (string?)e.Value);
        }
    }

    /// <summary>
    /// Binds and validates a <see cref="TrainJob"/> from <paramref name="jsonPath"/> plus environment and command-line overrides.
    /// </summary>
    /// <exception cref="FormatException">An unknown key, a wrong type or an invalid value (all problems, in one message).</exception>
    public static TrainJob LoadTrainJob(string jsonPath, IEnumerable<string>? overrides = null, bool environment = true)
    {
        var config = Build(jsonPath, overrides, environment);
        var job = Bind<TrainJob>(config, Path.GetFullPath(jsonPath), OtherVerbSections);
        var problems = job.Validate();
        if (problems.Count > 0) throw new FormatException($"{Path.GetFullPath(jsonPath)}: {string.Join("; ", problems)}");
        var dir = Path.GetDirectoryName(Path.GetFullPath(jsonPath))!;
        job.Model.Path = Resolve(dir, job.Model.Path);
        job.Data.TrainFile = Resolve(dir, job.Data.TrainFile);
        job.Data.EvalFile = Resolve(dir, job.Data.EvalFile);
        job.Output.Dir = Resolve(dir, job.Output.Dir);
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
