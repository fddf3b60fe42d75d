# Phase 5: one results table for the preset.


rule report:
    input:
        _report_inputs,
    output:
        md=REPORT_MD,
        csv=REPORT_CSV,
        # One file per method and one for the teachers: the DVC pipeline's metrics.
        summary=[str(f) for f in summary_files(P)],
    params:
        key=REPORT_KEY,
        # The whole preset, for the command; a function of `output`, so not a rerun trigger.
        preset=lambda wc, output: q(P),
    conda:
        "../envs/tskd.yaml"
    log:
        f"{OUT}/logs/report.log",
    shell:
        "tskd report --json {params.preset} > {log} 2>&1"
