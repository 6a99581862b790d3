"""Serve an edited version in MLflow's isolated environment and time it against ``--env-manager local``.

In a fresh sqlite store: the bundled model, one edit of ``examples/facts.json`` promoted to production, then
``mlflow models serve -m models:/editflow-default@production`` twice, with ``--env-manager uv`` (a new
virtual environment built from the model's own requirements: editflow's bundled wheel, torch,
transformers, safetensors and mlflow as ranges) and with ``--env-manager local``. Each is timed until
its first answer to ``/invocations``; the two answers must be equal.

    python benchmarks/isolated_serve.py [--torch-index DIR_OR_URL] [--workdir DIR]

``--torch-index`` points uv at CPU torch wheels (a folder, or https://download.pytorch.org/whl/cpu);
without it uv installs PyPI's torch, which brings CUDA libraries (several GB). MLflow's default
``virtualenv`` manager needs pyenv; ``uv`` (``pip install uv``) needs only a matching Python on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import markdown_table, publish  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL_URI = "models:/editflow-default@production"
FACTS = REPO / "examples" / "facts.json"
REQUEST = {"inputs": ["The Who's record label is"], "params": {"max_new_tokens": 4}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def invoke(port: int) -> list[str] | None:
    """The server's answer to ``REQUEST``, or ``None`` while it does not answer yet."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(REQUEST).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["predictions"]
    except OSError:
        return None


def serve_and_ask(env_manager: str, env: dict[str, str], log: Path, limit_s: float) -> tuple[float, list[str]]:
    """Seconds from ``mlflow models serve`` to its first answer, and the answer."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", MODEL_URI, "-p", str(port)]
    cmd += ["--env-manager", env_manager]
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while time.perf_counter() - t0 < limit_s:
                if proc.poll() is not None:
                    raise SystemExit(f"error: {env_manager} server exited {proc.returncode}; see {log}")
                answer = invoke(port)
                if answer is not None:
                    return time.perf_counter() - t0, answer
                time.sleep(2)
            raise SystemExit(f"error: {env_manager} server gave no answer in {limit_s:.0f} s; see {log}")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)


def editflow(args: list[str], env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "editflow.cli", *args], env=env, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch-index", help="folder or index URL with CPU torch wheels (uv: UV_FIND_LINKS / UV_INDEX)")
    p.add_argument("--workdir", help="keep the store and logs here (default: a temporary folder)")
    p.add_argument("--limit-minutes", type=float, default=30.0, help="per server, build included")
    a = p.parse_args()
    if shutil.which("uv") is None and not (Path(sys.executable).parent / "uv").exists():
        raise SystemExit("error: uv is not installed (pip install uv)")

    work = Path(a.workdir or tempfile.mkdtemp(prefix="editflow-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "MLFLOW_ENV_ROOT": str(work / "envs"),  # a fresh environment each time
        "EDITFLOW_QUIET": "1",
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    if a.torch_index:
        key = "UV_FIND_LINKS" if Path(a.torch_index).is_dir() else "UV_INDEX"
        env[key] = a.torch_index
        constraint = work / "cpu-torch.txt"
        constraint.write_text("torch<2.14\n")  # the CPU build of the installed minor release
        env["UV_CONSTRAINT"] = str(constraint)

    t0 = time.perf_counter()
    editflow(["edit", str(FACTS), "--promote", "always"], env)
    edit_s = time.perf_counter() - t0

    limit = a.limit_minutes * 60
    uv_s, uv_answer = serve_and_ask("uv", env, work / "serve-uv.log", limit)
    local_s, local_answer = serve_and_ask("local", env, work / "serve-local.log", limit)
    if uv_answer != local_answer:
        raise SystemExit(f"error: the isolated server answered {uv_answer}, the local one {local_answer}")

    rows = [
        f"| `--env-manager uv` (new environment: build + load + answer) | {uv_s:.0f} | {uv_s / local_s:.1f}× |",
        f"| `--env-manager local` (load + answer) | {local_s:.0f} | 1.0× |",
    ]
    caption = (
        f"`mlflow models serve -m {MODEL_URI}` (a {len(json.loads(FACTS.read_text()))}-fact edit of the bundled model, delta storage; "
        f"edit run {edit_s:.0f} s). Both answered {uv_answer!r} to {REQUEST['inputs'][0]!r}."
    )
    publish("isolated_serve.md", markdown_table(caption, ["server", "seconds to first answer", "vs local"], rows))


if __name__ == "__main__":
    main()
