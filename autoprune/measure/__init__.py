"""What a trial measures: accuracy, MACs, parameters and sparsity (`metrics`), and latency — the execution
formats a model can run in (`formats`), timing one model on one device (`timing`), which batches and where
(`latency`), and the cache that lets identical structures share one measurement (`cache`)."""
