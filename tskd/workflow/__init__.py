"""The workflow side: what Snakemake's rules and DVC's stages call. A job's spec named on its command
line (``job_spec``), its log (``joblog``), the DVC pipeline written from the grid (``dvc_pipeline``),
DVC's restored files made trusted by Snakemake (``dvc_sync``) and checked (``dvc_verify``), and what
each job of a grid is doing (``status``)."""
