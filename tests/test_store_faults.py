"""A read-only statistics cache and a full artifact store, made for real with a read-only bind mount
and a 2 MB tmpfs (needs root and mount(8), as CI has; skipped elsewhere): one ``error:`` line, no
traceback, nothing half-registered."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FACTS = ROOT / "examples" / "facts.json"
FAST = ["--stats-tokens", "2000", "--no-fluency", "--hparams", "v_num_grad_steps=5"]


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _can_mount(), reason="needs root and mount(8)")]


@contextmanager
def mounted(*args: str, target: Path):
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount refused here: {done.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False)


def editflow(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "editflow.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def _env(tmp_path: Path, cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "EDITFLOW_CACHE": str(cache),
        "EDITFLOW_QUIET": "1",
    }


def _error_lines(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.startswith("error:")]


def test_read_only_statistics_cache(tmp_path):
    src = tmp_path / "cache-src"
    src.mkdir()
    with mounted("--bind", str(src), target=tmp_path / "cache") as cache:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(cache)], check=True)
        env = _env(tmp_path, cache)
        out = editflow(tmp_path, env, "edit", str(FACTS), *FAST)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert _error_lines(out) == [
            f"error: statistics cache {cache}/stats is not writable (Read-only file system: {cache}/stats); "
            "pass a writable --stats-cache / --cache-dir or set EDITFLOW_CACHE"
        ]
        listed = editflow(tmp_path, env, "versions", "editflow-default", "--json")
    versions = [v["version"] for v in json.loads(listed.stdout)["versions"]]
    assert versions == [1]  # the base; no edit version


def test_full_artifact_store(tmp_path):
    with mounted("-t", "tmpfs", "-o", "size=2m", "tmpfs", target=tmp_path / "mlruns"):
        env = _env(tmp_path, tmp_path / "cache")
        out = editflow(tmp_path, env, "edit", str(FACTS), *FAST)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        (line,) = _error_lines(out)
        assert line.startswith("error: [Errno 28] No space left on device")
        listed = editflow(tmp_path, env, "versions", "editflow-default")
    assert listed.returncode == 1 and "no registered model named 'editflow-default'" in listed.stderr
