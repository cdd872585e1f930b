namespace QLora.Trainer;

/// <summary>The Hugging Face file names a tokenizer folder may hold, so every reader spells them the same way.</summary>
public static class TokenizerFiles
{
    /// <summary>The fast-tokenizer definition (normalizer, pre-tokenizer, model, post-processor, decoder, added tokens). Required.</summary>
    public const string TokenizerJson = "tokenizer.json";

    /// <summary>transformers' tokenizer settings: special token strings and the Jinja chat template. Optional.</summary>
    public const string TokenizerConfig = "tokenizer_config.json";

    /// <summary>Older special-token file; read when tokenizer_config.json does not name a token. Optional.</summary>
    public const string SpecialTokensMap = "special_tokens_map.json";

    /// <summary>Generation defaults: BOS/EOS/pad ids, where EOS may be a list (Llama 3). Optional.</summary>
    public const string GenerationConfig = "generation_config.json";
}
