# Phase 3: students, one job per (recipe, method, teacher-student pair, seed).


rule student:
    input:
        _student_inputs,
    output:
        model=f"{OUT}/students/{{recipe}}/{{method}}/{{run}}/seed{{seed}}/model.pt",
        metrics=f"{OUT}/students/{{recipe}}/{{method}}/{{run}}/seed{{seed}}/metrics.json",
    params:
        spec=lambda wc: identity(student_spec(wc)),
        job=lambda wc, output: job_dir(output),
        preset=lambda wc, output: PRESET_JSON,
        backbone=lambda wc: backbone_source(student_spec(wc)),
    wildcard_constraints:
        seed=r"\d+",
    threads: 1
    resources:
        gpus=1,
        # Launch settings file; empty: train in this process. `--profile slurm` sets it
        # (resources are no rerun trigger, so switching to the profile reruns nothing).
        launch="",
    conda:
        "../envs/tskd.yaml"
    log:
        f"{OUT}/logs/students/{{recipe}}/{{method}}/{{run}}-seed{{seed}}.log",
    shell:
        "tskd --log {log} train --preset {params.preset} --job {params.job} --launch={resources.launch:q}"
