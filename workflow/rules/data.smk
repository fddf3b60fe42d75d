# Phase 1: the dataset. Synthetic presets write it; real ones are verified where they are.


rule data:
    output:
        DATA_MARKER,
    params:
        spec=lambda wc: q({"dataset": grid.dataset_for_run(P).model_dump(mode="json")}),
    conda:
        "../envs/tskd.yaml"
    log:
        f"{OUT}/logs/data.log",
    shell:
        "tskd --log {log} data prepare --dataset {params.spec} --marker {output}"
