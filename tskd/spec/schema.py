"""JSON schema of the params, generated from the typed models in ``tskd.spec.config``.

Snakemake validates the config against the committed file; a test checks it is current.
"""

from __future__ import annotations

import json
from pathlib import Path

from tskd.io import atomic_write_text
from tskd.spec.config import Preset


def params_schema() -> dict:
    schema = Preset.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def write_schema(path: Path) -> Path:
    return atomic_write_text(path, json.dumps(params_schema(), indent=2, sort_keys=True) + "\n")
