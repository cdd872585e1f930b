namespace QLora.Trainer;

/// <summary>
/// GPT-2's byte-to-unicode table (bytes_to_unicode in openai/gpt-2, BYTES_CHAR in Hugging Face tokenizers): every byte
/// becomes a printable character, so byte-level BPE vocabularies are strings. Printable Latin-1 bytes map to themselves,
/// the other 68 to U+0100.. in byte order.
/// </summary>
internal static class ByteLevelAlphabet
{
    /// <summary>The character of each byte.</summary>
    public static readonly char[] ByteToChar = Build();

    /// <summary>The byte of each character below U+0144, or -1 for characters outside the alphabet.</summary>
    private static readonly short[] CharToByte = BuildInverse();

    private static char[] Build()
    {
        var map = new char[256];
        int n = 0;
        for (int b = 0; b < 256; b++)
        {
            bool printable = b is >= '!' and <= '~' or >= 0xA1 and <= 0xAC or >= 0xAE and <= 0xFF;
            map[b] = printable ? (char)b : (char)(256 + n++);
        }
        return map;
    }

    private static short[] BuildInverse()
    {
        var inverse = new short[0x144];
        Array.Fill(inverse, (short)-1);
        for (int b = 0; b < 256; b++)
            inverse[ByteToChar[b]] = (short)b;
        return inverse;
    }

    /// <summary>The byte a character stands for, or -1 when it is not in the alphabet.</summary>
    public static int ByteOf(char c) => c < CharToByte.Length ? CharToByte[c] : -1;

    /// <summary>The UTF-8 bytes of <paramref name="text"/>, each written as its alphabet character.</summary>
    public static string Map(string text)
    {
        int count = System.Text.Encoding.UTF8.GetByteCount(text);
        Span<byte> bytes = count <= 1024 ? stackalloc byte[count] : new byte[count];
        System.Text.Encoding.UTF8.GetBytes(text, bytes);
        return string.Create(count, bytes.ToArray(), static (span, b) =>
        {
            for (int i = 0; i < b.Length; i++)
                span[i] = ByteToChar[b[i]];
        });
    }
}
