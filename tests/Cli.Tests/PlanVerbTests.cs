using System.Text.Json.Nodes;

namespace QLora.Cli.Tests;

public class PlanVerbTests
{
    [Fact]
    public void PlansAPresetAgainstABudgetAndEndsWithJson()
    {
        var r = CliRunner.Run("plan", "--model", "llama-3.1-8b", "--budget", "24GB");
        Assert.True(r.ExitCode == 0, r.Stderr);
        var json = JsonNode.Parse(r.LastLine)!;
        Assert.Equal("llama-3.1-8b", json["plan"]!.GetValue<string>());
        Assert.Equal(24_000_000_000, json["budget_bytes"]!.GetValue<long>());
        Assert.True(json["fits"]!.GetValue<bool>());
        var components = json["components"]!.AsObject();
        long sum = components.Sum(c => c.Value!.GetValue<long>());
        Assert.Equal(json["peak_bytes"]!.GetValue<long>(), sum);
        Assert.True(components["quantized_weights"]!.GetValue<long>() > 3_000_000_000);
        Assert.Contains("quantized_weights", r.Stdout); // the table before the JSON
        Assert.Contains("fits the budget", r.Stdout);
    }

    [Fact]
    public void WithDoraThePlanCountsTheMagnitudesAndSaysHowManyWeightNormsAStepComputes()
    {
        var r = CliRunner.Run("plan", "--model", "llama-2-7b", "--dora");
        Assert.True(r.ExitCode == 0, r.Stderr);
        var json = JsonNode.Parse(r.LastLine)!;
        // LoRA's 39,976,960 (see below) plus one magnitude per output row: per layer 4·4096 + 2·11008 + 4096 = 42,496; 32 layers.
        Assert.Equal(39_976_960L + 32 * 42_496, json["trainable_params"]!.GetValue<long>());
        // 7 projections x 32 layers, each norm computed in the forward and again in the checkpoint recompute.
        Assert.Equal(7 * 32 * 2, json["dora_weight_norms_per_micro_batch"]!.GetValue<int>());
        Assert.Contains("DoRA r=16", r.Stdout);
        Assert.Contains("DoRA time: 448 weight norms per micro-batch", r.Stdout);
    }

    [Fact]
    public void WithRanksThePlanAddsTheDataParallelThroughputModel()
    {
        var r = CliRunner.Run("plan", "--model", "llama-2-7b", "--ranks", "4", "--micro-batches", "8");
        Assert.True(r.ExitCode == 0, r.Stderr);
        var dp = JsonNode.Parse(r.LastLine)!["data_parallel"]!;
        // LoRA r=16 on the 7 projections of Llama-2-7B, by hand: per layer 4·16·(4096+4096) + 2·16·(4096+11008) + 16·(11008+4096)
        // = 1,249,280 parameters; 32 layers: 39,976,960; 4 bytes each in the float32 gradient buffer.
        Assert.Equal(4L * 39_976_960, dp["allreduce_bytes"]!.GetValue<long>());
        Assert.Equal(4L * 39_976_960 * 2 * 3 / 4, dp["ring_bytes_per_rank"]!.GetValue<long>()); // a ring moves 2(N-1)/N of it per rank
        Assert.Equal(2, dp["micro_batches_per_rank"]!.GetValue<int>());
        Assert.Contains("data parallel: 4 ranks", r.Stdout);
        Assert.Null(JsonNode.Parse(CliRunner.Run("plan", "--model", "llama-2-7b").LastLine)!["data_parallel"]);
        Assert.Equal(1, CliRunner.Run("plan", "--model", "llama-2-7b", "--ranks", "4", "--micro-batches", "2").ExitCode);
    }

    [Fact]
    public void A70bWithoutStreamingDoesNotFitAndSaysWhatWould()
    {
        var r = CliRunner.Run("plan", "--model", "llama-3.1-70b", "--budget", "24GiB");
        Assert.True(r.ExitCode == 0, r.Stderr);
        var json = JsonNode.Parse(r.LastLine)!;
        Assert.False(json["fits"]!.GetValue<bool>());
        Assert.Equal(24L << 30, json["budget_bytes"]!.GetValue<long>());
        Assert.Contains(json["suggestions"]!.AsArray(), s => s!["change"]!.GetValue<string>().Contains("layer streaming"));

        var streamed = CliRunner.Run("plan", "--model", "llama-3.1-70b", "--budget", "24GiB", "--stream");
        Assert.True(JsonNode.Parse(streamed.LastLine)!["fits"]!.GetValue<bool>());
    }

    [Fact]
    public void ReadsAModelFolder()
    {
        using var tmp = new TempDir();
        TinyHfFolder.Write(tmp["model"], sharded: false);
        var r = CliRunner.Run("plan", "--model", tmp["model"], "--seq", "64");
        Assert.True(r.ExitCode == 0, r.Stderr);
        var json = JsonNode.Parse(r.LastLine)!;
        Assert.True(json["fits"]!.GetValue<bool>()); // no budget: nothing to exceed
        Assert.Null(json["budget_bytes"]);
    }

    [Fact]
    public void AnUnknownPresetIsAOneLineErrorListingThePresets()
    {
        var r = CliRunner.Run("plan", "--model", "llama-9");
        Assert.Equal(1, r.ExitCode);
        var line = Assert.Single(r.Stderr.TrimEnd().Split('\n'));
        Assert.StartsWith("qlora plan:", line);
        Assert.Contains("llama-3.1-8b", line);
        Assert.Contains("qwen2.5-32b", line);
    }

    [Fact]
    public void ABadSizeIsAOneLineError()
    {
        var r = CliRunner.Run("plan", "--model", "llama-2-7b", "--budget", "24XB");
        Assert.Equal(1, r.ExitCode);
        Assert.Contains("not a size", Assert.Single(r.Stderr.TrimEnd().Split('\n')));
    }
}
