# The MLflow store, set up once before any job starts (not in a dry run): its schema, the
# experiment and a parent run per group of seeds (tskd.tracking.runs.prepare_store). A training
# job then only reads them, without a lock, however many start at once. Only when a training job
# is to run: a DVC stage that prepares data, evaluates or reports does not touch the store.


# Snakemake keeps one handler of each kind: the warm server's start and stop sit here too.
onstart:
    _jobs = list(workflow.dag.needrun_jobs())
    if len(_jobs) >= WARM_MIN_JOBS:
        WARM.start()
    if any(job.rule.name in ("teacher", "student") for job in _jobs):
        from tskd.tracking.runs import prepare_store

        prepare_store(P)


onsuccess:
    WARM.stop()


# A DAG that fails (a missing dataset, a job that fails) never reaches the report, which would end
# what jobs left open: runs whose job was killed are ended KILLED here (tskd sync; a job still
# writing its directory is left to it). Best effort: the DAG's own error is what the user needs.
onerror:
    WARM.stop()
    try:
        from tskd.tracking.journal import grid_dirs, sync_dirs

        sync_dirs(grid_dirs(P))
    except Exception as e:
        print(f"tskd: MLflow runs of killed jobs not ended: {e}")
