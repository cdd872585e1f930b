namespace QLora.Trainer;

/// <summary>One line of a <see cref="MemoryPlan"/>: what a kind of memory holds and how many bytes of it are live at the peak.</summary>
/// <param name="Name">A stable snake_case key (the JSON key of <c>qlora plan</c>).</param>
/// <param name="Bytes">Bytes live at the peak moment (device memory).</param>
/// <param name="Description">What the bytes are, in words.</param>
public sealed record MemoryComponent(string Name, long Bytes, string Description);
