"""The training loop, evaluation and checkpoints shared by every method and dataset."""
