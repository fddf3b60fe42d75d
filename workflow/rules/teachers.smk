# Phase 2: teachers, trained from scratch or imported from a published checkpoint file.


rule teacher:
    # Every distillation job waits for its teacher: with fewer cores than jobs, the teacher goes
    # first, before the students that need none (vanilla), so the distillations are not held back.
    priority: 50
    input:
        DATA_MARKER,
        published=_published,
        backbone=lambda wc: _backbone(_teacher_spec(wc)),
    output:
        model=f"{OUT}/teachers/{{arch}}/seed{{tseed}}/model.pt",
        metrics=f"{OUT}/teachers/{{arch}}/seed{{tseed}}/metrics.json",
    params:
        spec=lambda wc: identity(_teacher_spec(wc)),
        job=lambda wc, output: job_dir(output),
        preset=lambda wc, output: PRESET_JSON,
        source=_teacher_source,
        backbone=lambda wc: backbone_source(_teacher_spec(wc)),
        cmd=_teacher_cmd,
    wildcard_constraints:
        tseed=r"\d+",
    threads: 1
    resources:
        gpus=1,
        # Launch settings file; empty: train in this process. `--profile slurm` sets it
        # (resources are no rerun trigger, so switching to the profile reruns nothing).
        launch="",
    conda:
        "../envs/tskd.yaml"
    log:
        f"{OUT}/logs/teachers/{{arch}}-seed{{tseed}}.log",
    shell:
        "tskd --log {log} {params.cmd} --preset {params.preset} --job {params.job} --launch={resources.launch:q}"
