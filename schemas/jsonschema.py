"""Export JSON Schemas of the input events so lab systems can validate what they publish."""
from __future__ import annotations

import json
from pathlib import Path

from .events import DoseEvent, LabResult, LiverFunctionPanel, Observation, SteroidEvent, VitalSign

SCHEMAS = {
    "lab-result": LabResult,
    "vital-sign": VitalSign,
    "liver-function-panel": LiverFunctionPanel,
    "treatment-dose": DoseEvent,
    "treatment-steroid": SteroidEvent,
    "observation": Observation,
}


def write_schemas(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in SCHEMAS.items():
        schema = model.model_json_schema()
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://sma-monitor.example/schemas/{name}.json"
        path = out / f"{name}.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(path)
    return written
