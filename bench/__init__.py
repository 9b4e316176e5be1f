"""Side-by-side performance and accuracy scripts; ``python -m bench`` runs them all."""
from __future__ import annotations

import json
from pathlib import Path


def report(out: dict, json_path: str | None) -> dict:
    """Print a script's result and, for the runner, write it to ``json_path``."""
    print(json.dumps(out, indent=2))
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=2))
    return out
