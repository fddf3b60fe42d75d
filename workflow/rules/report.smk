# Phase 5: one results table for the preset, and its plots.
from tskd.workflow.job_spec import write_report_preset
from tskd.reporting.plots import plot_files
from tskd.reporting.study import study_files

PLOTS = plot_files(P)
# The preset in its own order, as a file: the command (and the report's info panel) names it
# instead of holding kilobytes of JSON.
REPORT_PRESET = str(write_report_preset(P))


rule report:
    input:
        _report_inputs,
    output:
        md=REPORT_MD,
        # report.md on one page, its plots inlined: what `snakemake --report` shows of the results.
        html=report(REPORT_HTML, category="Results", labels={"page": "report"}),
        csv=REPORT_CSV,
        # One file per method and one for the teachers: the DVC pipeline's metrics.
        summary=[str(f) for f in summary_files(P)],
        # The plots, also pages of `snakemake --report report.html`.
        plots=[report(str(f), category="Plots", labels={"plot": f.stem}) for f in PLOTS.values()],
        # A preset with TSKD variants: the ablation study's table and plots (tskd.reporting.study).
        study=[report(str(f), category="Study", labels={"file": f.name}) for f in study_files(P)],
    params:
        key=REPORT_KEY,
        # A function of `output`, so not a rerun trigger (the file's name changes with the MLflow
        # experiment's, which reruns nothing).
        preset=lambda wc, output: REPORT_PRESET,
    conda:
        "../envs/tskd.yaml"
    log:
        f"{OUT}/logs/report.log",
    shell:
        "tskd report --json-file {params.preset} > {log} 2>&1"
