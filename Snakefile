# The tskd pipeline: prepare data -> train teachers -> distil students -> evaluate -> report.
# Jobs come from the preset's grid (tskd.spec.grid); each rule passes only the params it reads.
from snakemake.utils import min_version

min_version("9.0")


# The smoke preset unless one is given (`--configfile params/cifar100.yaml`): Snakemake would
# otherwise merge the given preset into this default one, key by key.
if not config:

    configfile: "params/smoke.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/teachers.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/tracking.smk"


rule all:
    input:
        REPORT_MD,
    default_target: True
