"""Option parsing shared by the registry commands."""

from __future__ import annotations

import json
from typing import Any

import click


def parse_hparams(text: str | None) -> dict[str, Any]:
    """``'{"v_lr": 0.3}'`` or ``"v_lr=0.3,mom2_update_weight=5000"`` -> dict (values stay strings
    where not JSON; the typed config coerces and rejects unknown keys)."""
    if not text or not text.strip():
        return {}
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not valid JSON: {exc.msg}", param_hint="--hparams") from None
        if not isinstance(value, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--hparams")
        return value
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(";" if ";" in text else ","))):
        if "=" not in part:
            raise click.BadParameter(f"expected key=value, got {part!r}", param_hint="--hparams")
        key, value = part.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def fail(message: str) -> None:
    """Print an error and exit with status 1."""
    click.secho(f"error: {message}", fg="red", err=True)
    raise SystemExit(1)


def version_ref(text: str) -> str:
    """``"3"`` stays a version number; ``"production"`` or ``"@production"`` names an alias."""
    text = text.strip()
    return text if text.isdigit() or text.startswith("@") else "@" + text
