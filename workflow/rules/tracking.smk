# The MLflow store, set up once before any job starts (not in a dry run): its schema, the
# experiment and a parent run per group of seeds (tskd.tracking_runs.prepare_store). A training
# job then only reads them, without a lock, however many start at once. Only when a training job
# is to run: a DVC stage that prepares data, evaluates or reports does not touch the store.


onstart:
    if any(job.rule.name in ("teacher", "student") for job in workflow.dag.needrun_jobs()):
        from tskd.tracking_runs import prepare_store

        prepare_store(P)
