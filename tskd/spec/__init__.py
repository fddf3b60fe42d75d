"""What to run: a preset's typed params (``config``), read strictly from YAML (``params_yaml``), its
JSON schema (``schema``), the grid of jobs and each job's ``RunSpec`` (``grid``) and a preset's
cheap rehearsal at full shape (``scale_preset``).

The layer below the learning core: the core takes its typed config and run specs from here. The
preset is checked against the core's registries (methods, architectures, dataset families,
published checkpoints) through deferred imports, the one way up (see docs/architecture.md)."""
