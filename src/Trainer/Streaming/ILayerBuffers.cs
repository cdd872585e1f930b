namespace QLora.Trainer;

/// <summary>
/// Where <see cref="LayerStreamer"/> keeps resident layers: the memory a layer's 4-bit parts are copied into and read
/// from by the dequantizer of the model's device. The streamer decides which layers are resident; this decides how a
/// buffer is obtained, filled and given back, so the residency logic is the same on the CPU backend and on a GPU.
/// </summary>
internal interface ILayerBuffers : IDisposable
{
    /// <summary>A buffer of at least <paramref name="bytes"/> (64-byte aligned) that no other layer holds. Called on the compute thread.</summary>
    nint Rent(long bytes);

    /// <summary>
    /// Fills <paramref name="buffer"/> with <paramref name="bytes"/> bytes that <paramref name="write"/> writes into host
    /// memory at the address it is given, and returns once compute may read them. Called on any thread, once per rental.
    /// </summary>
    void Fill(nint buffer, long bytes, Action<nint> write);

    /// <summary>Gives <paramref name="buffer"/> back; compute already queued may still read it (a device must let that finish before reusing it). Called on the compute thread.</summary>
    void Return(nint buffer);
}
