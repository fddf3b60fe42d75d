"""tskd: Temporal Supervised Knowledge Distillation pipeline."""
