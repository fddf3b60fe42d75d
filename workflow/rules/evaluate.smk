# Phase 4: evaluate each exported student file independently of its training run.


rule evaluate:
    # Before the next student whenever a login core is free (login_cores under --profile slurm): the
    # students wait on SLURM meanwhile, and evaluations left to the end run two at a time, in series
    # (the cifar100 rehearsal finished 131 students with 8 evaluated).
    priority: 10
    input:
        model=f"{OUT}/students/{{recipe}}/{{method}}/{{run}}/seed{{seed}}/model.pt",
    output:
        f"{OUT}/students/{{recipe}}/{{method}}/{{run}}/seed{{seed}}/eval.json",
    params:
        spec=lambda wc: identity(student_spec(wc)),
        job=lambda wc, output: job_dir(output),
        preset=lambda wc, output: PRESET_JSON,
    wildcard_constraints:
        seed=r"\d+",
    conda:
        "../envs/tskd.yaml"
    log:
        f"{OUT}/logs/evaluate/{{recipe}}/{{method}}/{{run}}-seed{{seed}}.log",
    shell:
        "tskd --log {log} evaluate --preset {params.preset} --job {params.job} --model {input.model} --out {output}"
