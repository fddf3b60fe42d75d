# Phase 2: teachers, trained from scratch or imported from a published checkpoint file.


rule teacher:
    input:
        DATA_MARKER,
    output:
        model=f"{OUT}/teachers/{{arch}}/seed{{tseed}}/model.pt",
        metrics=f"{OUT}/teachers/{{arch}}/seed{{tseed}}/metrics.json",
    params:
        spec=lambda wc: q(_teacher_spec(wc)),
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
        "tskd {params.cmd} --spec {params.spec} --launch={resources.launch:q} > {log} 2>&1"
