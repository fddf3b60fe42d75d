"""MLflow: the store (``store``), what a training run carries there (``runs``: names, tags, the
parent of its seeds, dataset, logged model) and the journal that keeps a run's records in its
directory until the store answers (``journal``). Knows nothing of the report (``tskd.reporting.publish``)."""
