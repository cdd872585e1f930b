// Tests here use torch's global RNG (dropout) and all cores for matmuls: run them one at a time.
[assembly: CollectionBehavior(DisableTestParallelization = true)]
