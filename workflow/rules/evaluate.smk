# Phase 4: evaluate each exported student file independently of its training run.


rule evaluate:
    message:
        "evaluate {wildcards.method} {wildcards.run} ({wildcards.recipe} recipe) seed {wildcards.seed}; log: {log}"
    input:
        model=f"{OUT}/students/{{recipe}}/{{method}}/{{run}}/seed{{seed}}/model.pt",
    output:
        f"{OUT}/students/{{recipe}}/{{method}}/{{run}}/seed{{seed}}/eval.json",
    params:
        spec=lambda wc: identity(student_spec(wc)),
        place=lambda wc, output: placement(student_spec(wc)),
    wildcard_constraints:
        seed=r"\d+",
    conda:
        "../envs/tskd.yaml"
    log:
        f"{OUT}/logs/evaluate/{{recipe}}/{{method}}/{{run}}-seed{{seed}}.log",
    shell:
        "tskd --log {log} evaluate --spec {params.spec} --place {params.place} --model {input.model} --out {output}"
