"""The measured tables the README quotes (`autoprune bench …`): pruning and healing methods, latency, data,
serving, a cluster and faults."""
