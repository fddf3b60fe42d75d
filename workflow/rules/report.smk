# Phase 5: one results table for the preset, and its plots.
import json

from tskd.plots import plot_files
from tskd.study import study_files

PLOTS = plot_files(P)


def _preset_in_order(wc, output):
    # Not q(P): canonical JSON sorts keys, and the report lists methods and pairs in the preset's order.
    return shlex.quote(json.dumps(P.model_dump(mode="json")))


rule report:
    input:
        _report_inputs,
    output:
        md=report(REPORT_MD, category="Results", labels={"table": "report.md"}),
        csv=REPORT_CSV,
        # One file per method and one for the teachers: the DVC pipeline's metrics.
        summary=[str(f) for f in summary_files(P)],
        # The plots, also pages of `snakemake --report report.html`.
        plots=[report(str(f), category="Plots", labels={"plot": f.stem}) for f in PLOTS.values()],
        # A preset with TSKD variants: the ablation study's table and plots (tskd.study).
        study=[report(str(f), category="Study", labels={"file": f.name}) for f in study_files(P)],
    params:
        key=REPORT_KEY,
        # The whole preset, for the command; a function of `output`, so not a rerun trigger.
        preset=_preset_in_order,
    conda:
        "../envs/tskd.yaml"
    log:
        f"{OUT}/logs/report.log",
    shell:
        "tskd report --json {params.preset} > {log} 2>&1"
