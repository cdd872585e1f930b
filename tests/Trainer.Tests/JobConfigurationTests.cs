using System.Text.Json.Nodes;

namespace QLora.Trainer.Tests;

public class JobConfigurationTests
{
    static string Job(TempFolder dir, string json)
    {
        var path = dir.File("job.json");
        File.WriteAllText(path, json);
        return path;
    }

    const string Minimal = """{ "Model": { "Path": "m" }, "Data": { "TrainFile": "t.jsonl" }, "Output": { "Dir": "o" } }""";

    [Fact]
    public void AMinimalJobBindsWithPeftDefaultsAndPathsRelativeToTheJobFile()
    {
        using var dir = new TempFolder();
        var job = JobConfiguration.LoadTrainJob(Job(dir, Minimal), environment: false);
        Assert.Equal(Path.Combine(dir.Path, "m"), job.Model.Path);
        Assert.Equal(Path.Combine(dir.Path, "t.jsonl"), job.Data.TrainFile);
        Assert.Equal(16, job.Lora.Rank);
        Assert.Null(job.Lora.TargetModules); // all linear layers
        Assert.Equal(LoraOptions.AllLinear, TrainingRun.LoraOptionsOf(job.Lora).TargetModules);
        Assert.Equal(2e-4, job.Training.LearningRate);
        Assert.True(job.Data.Packing);
    }

    [Fact]
    public void QloraVariablesThatAreNotJobKeysAreNotReadAndWrongOnesAreNamed()
    {
        using var dir = new TempFolder();
        var path = Job(dir, Minimal);
        string[] names = ["QLORA_HOME", "QLORA_CUDART", "QLORA_Lora__Rnak", "QLORA_Lora__Rank"];
        try
        {
            Environment.SetEnvironmentVariable("QLORA_HOME", "/opt/qlora");
            Environment.SetEnvironmentVariable("QLORA_CUDART", "/nowhere/libcudart.so");
            Environment.SetEnvironmentVariable("QLORA_Lora__Rank", "8");
            Assert.Equal(8, JobConfiguration.LoadTrainJob(path).Lora.Rank); // QLORA_HOME and QLORA_CUDART are not job keys
            Environment.SetEnvironmentVariable("QLORA_Lora__Rnak", "8");
            var e = Assert.Throws<FormatException>(() => JobConfiguration.LoadTrainJob(path));
            Assert.Contains("unknown key Lora:Rnak", e.Message);
            Assert.Contains("QLORA_Lora__Rnak", e.Message); // the source is named
            Environment.SetEnvironmentVariable("QLORA_Lora__Rnak", null);
            Environment.SetEnvironmentVariable("QLORA_Lora__Rank", "zero");
            Assert.Contains("QLORA_Lora__Rank", Assert.Throws<FormatException>(() => JobConfiguration.LoadTrainJob(path)).Message);
        }
        finally
        {
            foreach (var n in names) Environment.SetEnvironmentVariable(n, null);
        }
    }

    [Fact]
    public void AnEmptyOverrideUnsetsAnOptionalSetting()
    {
        using var dir = new TempFolder();
        var path = Job(dir, """{ "Model": { "Path": "m", "ChatTemplate": "chatml" }, "Data": { "TrainFile": "t.jsonl", "EvalFile": "e.jsonl" }, "Output": { "Dir": "o" } }""");
        var job = JobConfiguration.LoadTrainJob(path, ["--Data:EvalFile", "", "--Model:ChatTemplate="], environment: false);
        Assert.Null(job.Data.EvalFile);
        Assert.Null(job.Model.ChatTemplate);
        Assert.Equal(Path.Combine(dir.Path, "e.jsonl"), JobConfiguration.LoadTrainJob(path, environment: false).Data.EvalFile);
    }

    [Fact]
    public void EnvironmentVariablesOverrideTheFileAndTheCommandLineOverridesBoth()
    {
        using var dir = new TempFolder();
        var path = Job(dir, """{ "Model": { "Path": "m" }, "Data": { "TrainFile": "t.jsonl" }, "Output": { "Dir": "o" }, "Training": { "LearningRate": 0.001, "MaxSteps": 5 }, "Lora": { "TargetModules": ["q_proj", "v_proj"] } }""");
        try
        {
            Environment.SetEnvironmentVariable("QLORA_Training__LearningRate", "0.003");
            Environment.SetEnvironmentVariable("QLORA_Training__MaxSteps", "9");
            var fromEnv = JobConfiguration.LoadTrainJob(path);
            Assert.Equal(0.003, fromEnv.Training.LearningRate);
            Assert.Equal(9, fromEnv.Training.MaxSteps);
            Assert.Equal(["q_proj", "v_proj"], fromEnv.Lora.TargetModules!); // a list replaces the default, not extends it
            Environment.SetEnvironmentVariable("QLORA_LIBTORCH", "/opt/torch/lib"); // the process's libtorch, not a job key
            Environment.SetEnvironmentVariable("QLORA_LIBTORCH_ALLOW_MISMATCH", "1");
            Environment.SetEnvironmentVariable("QLORA_MPI_LIBRARY", "/opt/mpi/lib/libmpi.so");
            Assert.Equal(9, JobConfiguration.LoadTrainJob(path).Training.MaxSteps);
            var fromArgs = JobConfiguration.LoadTrainJob(path, ["--Training:LearningRate", "1e-4", "--Lora:Rank=8"]);
            Assert.Equal(1e-4, fromArgs.Training.LearningRate);
            Assert.Equal(9, fromArgs.Training.MaxSteps);
            Assert.Equal(8, fromArgs.Lora.Rank);
            Environment.SetEnvironmentVariable("QLORA_Trainin__MaxSteps", "3");
            var e = Assert.Throws<FormatException>(() => JobConfiguration.LoadTrainJob(path));
            Assert.Contains("unknown key Trainin", e.Message);
        }
        finally
        {
            Environment.SetEnvironmentVariable("QLORA_Training__LearningRate", null);
            Environment.SetEnvironmentVariable("QLORA_Training__MaxSteps", null);
            Environment.SetEnvironmentVariable("QLORA_Trainin__MaxSteps", null);
            Environment.SetEnvironmentVariable("QLORA_LIBTORCH", null);
            Environment.SetEnvironmentVariable("QLORA_LIBTORCH_ALLOW_MISMATCH", null);
            Environment.SetEnvironmentVariable("QLORA_MPI_LIBRARY", null);
        }
    }

    [Theory]
    [InlineData("Training:LearningRat", "0.1", "unknown key Training:LearningRat; allowed keys in Training are Seed, MaxSteps")]
    [InlineData("Trainig:MaxSteps", "3", "unknown key Trainig; allowed keys in the job are Model, Quantization, Lora, Data, Training, Eval, Output, Memory")]
    [InlineData("Training:MaxSteps", "ten", "Training:MaxSteps = 'ten': an integer required")]
    [InlineData("Training:MaxSteps", "-1", "Training:MaxSteps = -1: 0 (use Epochs) or a positive integer")]
    [InlineData("Training:Epochs", "0", "Training:Epochs = 0: a positive number when MaxSteps is 0")]
    [InlineData("Training:LearningRate", "-1", "Training:LearningRate = -1: a number in (0, 1)")]
    [InlineData("Training:LearningRate", "NaN", "Training:LearningRate = 'NaN': a finite number required")]
    [InlineData("Training:MicroBatchSize", "0", "Training:MicroBatchSize = 0: an integer from 1 to 4096")]
    [InlineData("Training:GradientAccumulationSteps", "0", "Training:GradientAccumulationSteps = 0: an integer from 1 to 65536")]
    [InlineData("Training:Scheduler", "step", "Training:Scheduler = 'step': allowed values are cosine, linear, constant")]
    [InlineData("Training:WarmupSteps", "-2", "Training:WarmupSteps = -2: a non-negative integer")]
    [InlineData("Training:MinLearningRateRatio", "2", "Training:MinLearningRateRatio = 2: a number in [0, 1]")]
    [InlineData("Training:WeightDecay", "1.5", "Training:WeightDecay = 1.5: a number in [0, 1)")]
    [InlineData("Training:MaxGradNorm", "-1", "Training:MaxGradNorm = -1: 0 (off) or a positive number")]
    [InlineData("Training:LoraPlusRatio", "0.5", "Training:LoraPlusRatio = 0.5: a number >= 1")]
    [InlineData("Training:Optimizer", "sgd", "Training:Optimizer = 'sgd': allowed values are adamw, adamw8bit")]
    [InlineData("Training:PagedOptimizer", "maybe", "Training:PagedOptimizer = 'maybe': true or false required")]
    [InlineData("Training:LossChunkTokens", "0", "Training:LossChunkTokens = 0: an integer from 1 to 1048576")]
    [InlineData("Training:MaxConsecutiveBadSteps", "0", "Training:MaxConsecutiveBadSteps = 0: a positive integer")]
    [InlineData("Training:Threads", "-1", "Training:Threads = -1: 0 (default) or a thread count")]
    [InlineData("Training:DataParallel", "nccl", "Training:DataParallel = 'nccl': allowed values are auto, off")]
    [InlineData("Training:CollectiveTimeoutSeconds", "0", "Training:CollectiveTimeoutSeconds = 0: an integer from 1 to 86400")]
    [InlineData("Model:ComputeDType", "int8", "Model:ComputeDType = 'int8': allowed values are bfloat16, float16, float32")]
    [InlineData("Model:ChatTemplate", "vicuna", "Model:ChatTemplate = 'vicuna': allowed values are llama3, llama3.1, llama3.2, chatml, mistral, mistral-spaces, alpaca")]
    [InlineData("Quantization:QuantType", "int4", "Quantization:QuantType = 'int4': allowed values are nf4, fp4")]
    [InlineData("Quantization:Blocksize", "100", "Quantization:Blocksize = 100: a power of two from 32 to 4096")]
    [InlineData("Lora:Rank", "0", "Lora:Rank = 0: an integer from 1 to 4096")]
    [InlineData("Lora:Alpha", "0", "Lora:Alpha = 0: a positive number")]
    [InlineData("Lora:Dropout", "1", "Lora:Dropout = 1: a number in [0, 1)")]
    [InlineData("Lora:TargetRegex", "(", "Lora:TargetRegex = '(': not a valid regular expression")]
    [InlineData("Lora:Init", "zeros", "Lora:Init = 'zeros': allowed values are kaiming, gaussian")]
    [InlineData("Lora:DType", "float16", "Lora:DType = 'float16': allowed values are float32, bfloat16")]
    [InlineData("Lora:LayersToTransform:0", "-1", "Lora:LayersToTransform = '-1': non-negative layer indices")]
    [InlineData("Data:EvalFraction", "1", "Data:EvalFraction = 1: a number in [0, 1)")]
    [InlineData("Data:Format", "csv", "Data:Format = 'csv': allowed values are auto, text, instruction, chat")]
    [InlineData("Data:MaxSeqLength", "4", "Data:MaxSeqLength = 4: an integer from 8 to 1048576")]
    [InlineData("Data:MalformedLines", "ignore", "Data:MalformedLines = 'ignore': allowed values are stop, skip")]
    [InlineData("Eval:EveryNSteps", "-1", "Eval:EveryNSteps = -1: 0 (only at the end) or a positive integer")]
    [InlineData("Eval:MaxRows", "-1", "Eval:MaxRows = -1: 0 (all) or a positive integer")]
    [InlineData("Eval:ExactMatchSamples", "-1", "Eval:ExactMatchSamples = -1: 0 (all) or a positive integer")]
    [InlineData("Eval:MaxNewTokens", "0", "Eval:MaxNewTokens = 0: an integer from 1 to 65536")]
    [InlineData("Eval:BatchSize", "0", "Eval:BatchSize = 0: an integer from 1 to 4096")]
    [InlineData("Output:SaveEveryNSteps", "-1", "Output:SaveEveryNSteps = -1: 0 (only at the end) or a positive integer")]
    [InlineData("Output:KeepLast", "0", "Output:KeepLast = 0: a positive integer")]
    [InlineData("Memory:Budget", "lots", "Memory:Budget = 'lots': a size such as 24GB")]
    [InlineData("Model:Path", "", "Model:Path = '': a Hugging Face model folder is required")]
    [InlineData("Data:TrainFile", "", "Data:TrainFile = '': a JSONL file of training samples is required")]
    [InlineData("Output:Dir", "", "Output:Dir = '': an output folder is required")]
    public void EveryBadValueIsNamedWithWhatIsAllowed(string key, string value, string expected)
    {
        using var dir = new TempFolder();
        var e = Assert.Throws<FormatException>(() => JobConfiguration.LoadTrainJob(Job(dir, Minimal), [$"--{key}", value], environment: false));
        Assert.Contains(expected, e.Message);
        Assert.Contains(dir.File("job.json"), e.Message);
    }

    [Fact]
    public void StructuralMistakesAndOtherVerbsSectionsAreHandled()
    {
        using var dir = new TempFolder();
        var e = Assert.Throws<FormatException>(() => JobConfiguration.LoadTrainJob(Job(dir, """{ "Model": "m" }"""), environment: false));
        Assert.Contains("Model = 'm': a section (JSON object) is required", e.Message);
        e = Assert.Throws<FormatException>(() => JobConfiguration.LoadTrainJob(Job(dir, """{ "Model": { "Path": "m" }, "Lora": { "TargetModules": "q_proj" } }"""), environment: false));
        Assert.Contains("Lora:TargetModules = 'q_proj': a JSON array is required", e.Message);
        e = Assert.Throws<FormatException>(() => JobConfiguration.LoadTrainJob(Job(dir, """{ "Model": { "Path": "m" """), environment: false));
        Assert.Contains("not valid JSON", e.Message);
        e = Assert.Throws<FormatException>(() => JobConfiguration.LoadTrainJob(Job(dir, Minimal), ["-x"], environment: false));
        Assert.Contains("--Section:Key value", e.Message);
        Assert.Throws<FileNotFoundException>(() => JobConfiguration.LoadTrainJob(dir.File("none.json"), environment: false));
        // The quantize verb's section may live in the same file.
        var withQuantize = JsonNode.Parse(Minimal)!.AsObject();
        withQuantize["Quantize"] = new JsonObject { ["Input"] = "x", ["Anything"] = 1 };
        var job = JobConfiguration.LoadTrainJob(Job(dir, withQuantize.ToJsonString()), environment: false);
        Assert.Equal(Path.Combine(dir.Path, "m"), job.Model.Path);
    }

    [Theory]
    [InlineData("24GB", 24_000_000_000L)]
    [InlineData("8GiB", 8L << 30)]
    [InlineData("6000 MB", 6_000_000_000L)]
    [InlineData("1500000000", 1_500_000_000L)]
    [InlineData("512KiB", 512L * 1024)]
    public void BudgetSizesParseAsPeopleWriteThem(string text, long bytes) => Assert.Equal(bytes, ByteSize.Parse(text));
}
