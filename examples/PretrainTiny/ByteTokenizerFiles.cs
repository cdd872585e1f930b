using System.Text.Json.Nodes;

namespace QLora.Examples.PretrainTiny;

/// <summary>
/// A byte-level BPE tokenizer in Hugging Face's tokenizer.json format (GPT-2/Llama 3 byte alphabet, ids 0–255 are the
/// bytes, no merges: every byte is a token, which suits a model this small and keeps digits separate), with special
/// tokens &lt;s&gt; 256, &lt;/s&gt; 257, &lt;pad&gt; 258, BOS added by the post-processor, and Mistral's chat template.
/// </summary>
internal static class ByteTokenizerFiles
{
    public const int Bos = 256, Eos = 257, Pad = 258, VocabSize = 259;

    public const string MistralChatTemplate =
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" +
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}" +
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}" +
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}" +
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

    /// <summary>GPT-2's reversible byte → printable character map.</summary>
    static string[] ByteToUnicode()
    {
        var map = new string[256];
        int extra = 0;
        for (int b = 0; b < 256; b++)
        {
            bool printable = b is >= '!' and <= '~' or >= 0xA1 and <= 0xAC or >= 0xAE and <= 0xFF;
            map[b] = printable ? ((char)b).ToString() : ((char)(256 + extra++)).ToString();
        }
        return map;
    }

    public static void Write(string folder)
    {
        var bytes = ByteToUnicode();
        var vocab = new JsonObject();
        for (int b = 0; b < 256; b++) vocab[bytes[b]] = b;
        JsonObject Added(int id, string content) => new()
        {
            ["id"] = id, ["content"] = content, ["single_word"] = false, ["lstrip"] = false, ["rstrip"] = false, ["normalized"] = false, ["special"] = true,
        };
        JsonObject ByteLevel(bool prefixSpace, bool trimOffsets) => new() { ["type"] = "ByteLevel", ["add_prefix_space"] = prefixSpace, ["trim_offsets"] = trimOffsets, ["use_regex"] = true };
        var bosTemplate = new JsonObject
        {
            ["type"] = "TemplateProcessing",
            ["single"] = new JsonArray(
                new JsonObject { ["SpecialToken"] = new JsonObject { ["id"] = "<s>", ["type_id"] = 0 } },
                new JsonObject { ["Sequence"] = new JsonObject { ["id"] = "A", ["type_id"] = 0 } }),
            ["pair"] = new JsonArray(
                new JsonObject { ["SpecialToken"] = new JsonObject { ["id"] = "<s>", ["type_id"] = 0 } },
                new JsonObject { ["Sequence"] = new JsonObject { ["id"] = "A", ["type_id"] = 0 } },
                new JsonObject { ["SpecialToken"] = new JsonObject { ["id"] = "<s>", ["type_id"] = 1 } },
                new JsonObject { ["Sequence"] = new JsonObject { ["id"] = "B", ["type_id"] = 1 } }),
            ["special_tokens"] = new JsonObject { ["<s>"] = new JsonObject { ["id"] = "<s>", ["ids"] = new JsonArray(Bos), ["tokens"] = new JsonArray("<s>") } },
        };
        var tokenizer = new JsonObject
        {
            ["version"] = "1.0", ["truncation"] = null, ["padding"] = null,
            ["added_tokens"] = new JsonArray(Added(Bos, "<s>"), Added(Eos, "</s>"), Added(Pad, "<pad>")),
            ["normalizer"] = null,
            ["pre_tokenizer"] = ByteLevel(false, true),
            ["post_processor"] = new JsonObject { ["type"] = "Sequence", ["processors"] = new JsonArray(ByteLevel(true, false), bosTemplate) },
            ["decoder"] = ByteLevel(true, true),
            ["model"] = new JsonObject
            {
                ["type"] = "BPE", ["dropout"] = null, ["unk_token"] = null, ["continuing_subword_prefix"] = null, ["end_of_word_suffix"] = null,
                ["fuse_unk"] = false, ["byte_fallback"] = false, ["ignore_merges"] = false, ["vocab"] = vocab, ["merges"] = new JsonArray(),
            },
        };
        var indented = new System.Text.Json.JsonSerializerOptions { WriteIndented = true };
        File.WriteAllText(Path.Combine(folder, "tokenizer.json"), tokenizer.ToJsonString(indented));
        File.WriteAllText(Path.Combine(folder, "tokenizer_config.json"), new JsonObject
        {
            ["tokenizer_class"] = "PreTrainedTokenizerFast", ["bos_token"] = "<s>", ["eos_token"] = "</s>", ["pad_token"] = "<pad>",
            ["add_bos_token"] = true, ["add_eos_token"] = false, ["model_max_length"] = 512, ["clean_up_tokenization_spaces"] = false,
            ["chat_template"] = MistralChatTemplate,
        }.ToJsonString(indented));
        File.WriteAllText(Path.Combine(folder, "special_tokens_map.json"), new JsonObject
        {
            ["bos_token"] = "<s>", ["eos_token"] = "</s>", ["pad_token"] = "<pad>",
        }.ToJsonString(indented));
    }
}
