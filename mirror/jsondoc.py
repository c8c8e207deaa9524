"""JSON from outside (clients, upstreams, pushed manifests), parsed in one place.

`json.loads` raises RecursionError, not ValueError, for a document nested past the parser's
depth (a few hundred thousand `[`): every caller that caught ValueError alone let such a body
through as a 500. Here it is a ValueError like any other text that is not JSON."""

from __future__ import annotations

import json
from typing import Any


def parse_json(data: str | bytes) -> Any:
    """`json.loads`, with ValueError for anything that is not a JSON document (too deep too)."""
    try:
        return json.loads(data)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc
