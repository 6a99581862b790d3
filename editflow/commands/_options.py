"""Option parsing, exit codes and user-error reporting shared by the commands.

Exit codes (every command):

=====  ====================  =====================================================================
code   constant              meaning
=====  ====================  =====================================================================
0      ``EXIT_OK``           success
1      ``EXIT_ERROR``        user or environment error, reported as one ``error:`` line on stderr:
                             missing model, version, alias or file; bad ``models:/`` URI; tracking
                             server unreachable; registry refused the change
2      ``EXIT_USAGE``        bad command line (click's usage errors: unknown option, bad choice)
3      ``EXIT_GATE_FAILED``  ``edit``: the version was registered but the gate failed, so it was
                             not promoted (production unchanged)
=====  ====================  =====================================================================

Commands wrap their body in :func:`user_errors`; known user errors become ``error: ...`` and
``EXIT_ERROR``, anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from editflow.registry.store import Registry, mask_uri  # mask_uri re-exported: the commands mask URIs they print

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_GATE_FAILED = 3

#: Seconds the reachability probe of an ``http(s)://`` tracking server waits.
PROBE_TIMEOUT_S = 5.0

F = TypeVar("F", bound=Callable[..., Any])

json_option = click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON document on stdout instead of text (errors still go to stderr as one 'error:' line, exit 1).",
)


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


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print one ``error:`` line on stderr and exit with ``code``."""
    click.secho(f"error: {message}", fg="red", err=True)
    raise SystemExit(code)


def version_ref(text: str) -> str:
    """``"3"`` stays a version number; ``"production"`` or ``"@production"`` names an alias."""
    text = text.strip()
    return text if text.isdigit() or text.startswith("@") else "@" + text


def echo_json(document: Any) -> None:
    """Print ``document`` as one indented JSON document (non-JSON values as strings)."""
    click.echo(json.dumps(document, indent=2, default=str))


def is_remote(uri: str) -> bool:
    """An MLflow tracking server (``http(s)://``) rather than a database or file store."""
    return uri.split(":", 1)[0].lower() in {"http", "https"}


def check_tracking_server(uri: str | None = None) -> None:
    """Raise :class:`ConnectionError` naming ``uri`` (masked) if an ``http(s)://`` server does not answer.

    One request, no retries: any HTTP answer (even 401/404) counts as reachable. Stores that are not
    servers are not probed."""
    import requests

    from editflow.registry.store import default_tracking_uri

    uri = uri or default_tracking_uri()
    if not is_remote(uri):
        return
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S)
    except requests.RequestException as exc:
        raise ConnectionError(f"tracking server {mask_uri(uri)} is unreachable ({type(exc).__name__})") from None


def require_model(reg: Registry, name: str) -> None:
    """Raise :class:`ValueError` for a name editflow does not accept, :class:`LookupError` if ``name``
    is not a registered model of ``reg``."""
    from editflow.registry.versions import check_model_name, is_not_found

    check_model_name(name)
    try:
        reg.client.get_registered_model(name)
    except Exception as exc:
        if is_not_found(exc):
            raise LookupError(f"no registered model named {name!r}") from None
        raise


def _caused_by(exc: BaseException, types: tuple[type[BaseException], ...]) -> bool:
    """``exc`` or any exception in its cause/context chain is one of ``types``."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, types):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _network_message(exc: BaseException) -> str:
    """A refused, unresolvable or timed-out connection; named as the tracking server's when it is one."""
    from editflow.registry.store import default_tracking_uri

    text, uri = str(exc), default_tracking_uri()
    if "unreachable" in text:
        return text
    return f"tracking server {uri} is unreachable: {text}" if is_remote(uri) else f"network error: {text}"


def user_message(exc: BaseException) -> str | None:
    """The ``error:`` text (credentials masked) for a known user error, ``None`` for anything else (a bug)."""
    import requests
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import OperationalError

    from editflow.registry.store import default_tracking_uri

    if _caused_by(exc, (requests.ConnectionError, requests.Timeout, ConnectionError)):
        return mask_uri(_network_message(exc))
    if isinstance(exc, ModuleNotFoundError):  # e.g. the driver of a postgresql:// or mysql:// store
        return f"{exc} (install it in this environment)"
    if _caused_by(exc, (OperationalError,)):  # a SQL store refused the connection or the statement
        return mask_uri(f"tracking store {default_tracking_uri()}: {str(exc).strip().splitlines()[0]}")
    if isinstance(exc, MlflowException):
        known = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS"}
        return mask_uri(exc.message) if exc.error_code in known else None
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"no such file or directory: {exc.filename}"
    if isinstance(exc, FileExistsError) and exc.filename:
        return f"already exists: {exc.filename}"
    if isinstance(exc, LookupError) and not isinstance(exc, (KeyError, IndexError)):  # those are bugs
        return str(exc.args[0]) if exc.args else type(exc).__name__
    if isinstance(exc, (ValueError, OSError)):
        return mask_uri(str(exc)) or type(exc).__name__
    return None


def user_errors(func: F | None = None, *, note: str = "", probe: bool = True) -> Any:
    """Decorate a command: probe an ``http(s)://`` tracking server first (unless ``probe=False``:
    a command that may not need the store calls :func:`check_tracking_server` itself), and turn known
    user errors (:func:`user_message`) into one ``error:`` line and :data:`EXIT_ERROR`; ``note`` is
    appended (e.g. ``"production unchanged"``). Use as ``@user_errors`` or ``@user_errors(note=...)``."""

    def decorate(f: F) -> F:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                if probe:
                    check_tracking_server()
                return f(*args, **kwargs)
            except Exception as exc:
                message = user_message(exc)
                if message is None:
                    raise
                text = f"{message} ({note})" if note else message
                fail(" ".join(text.split()))  # one line, whatever the exception's text

        return wrapper  # type: ignore[return-value]

    return decorate(func) if func is not None else decorate
