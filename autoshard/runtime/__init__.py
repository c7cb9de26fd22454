"""Runtime: collectives, lowering to shard_map + jit, and the ParallelFunction."""
