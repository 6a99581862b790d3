"""``editflow verify NAME [VERSION]``: check a version's weights (and its root base's) against their
recorded SHA-256 digests; ``--repair`` first cleans up what interrupted commands left behind."""

from __future__ import annotations

import click

from editflow.commands._options import echo_json, json_option, require_model, user_errors, version_ref


@click.command("verify")
@click.argument("name")
@click.argument("version", required=False, default="production")
@click.option(
    "--repair",
    is_flag=True,
    help="First finish or revert interrupted promotions, delete abandoned "
    "(pending) registrations and end orphaned runs FAILED.",
)
@click.option(
    "--grace",
    type=float,
    default=None,
    help="Seconds after which a pending registration or "
    "promotion of a process that cannot be checked counts as abandoned (default 600).",
)
@json_option
@user_errors(note="nothing was changed by the check")
def command(name: str, version: str, repair: bool, grace: float | None, as_json: bool) -> None:
    """Verify VERSION (a number or an alias, default production) of NAME and its root base.

    Exit status 0 when every weights file matches its recorded digest, 1 (one ``error:`` line naming
    the file) otherwise.

    \b
    --json prints {"name": NAME, "version": int, "repaired": [str],
      "checked": [{"version": int|null, "uri": str, "files": {relpath: sha256}}]}.
    """
    from editflow.registry import integrity
    from editflow.registry.store import Registry
    from editflow.registry.versions import resolve_version

    reg = Registry()
    require_model(reg, name)
    grace_s = {"grace_s": grace} if grace is not None else {}
    repaired = integrity.repair(reg, name, **grace_s).lines() if repair else []
    v = resolve_version(reg, name, version_ref(version))
    checked = integrity.verify_version(reg, name, v)
    if as_json:
        echo_json(
            {
                "name": name,
                "version": v,
                "repaired": repaired,
                "checked": [{"version": c.version, "uri": c.uri, "files": c.files} for c in checked],
            }
        )
        return
    for line in repaired:
        click.echo(f"repair: {line}")
    for c in checked:
        what = f"version {c.version}" if c.version is not None else c.uri
        detail = ", ".join(f"{rel} {sha[:12]}" for rel, sha in sorted(c.files.items())) or "no recorded digests"
        click.echo(f"{name} {what}: ok ({detail})")
