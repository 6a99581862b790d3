"""A process killed during the statistics or the edit leaves no version, production where it was,
its run marked FAILED once repaired, and no stale temporary file in the statistics cache."""

from __future__ import annotations

import os
import time

import pytest
from test_integrity import cli, consistent, edit_args, lineage, ws  # noqa: F401 - fixtures

from editflow.registry import integrity, ledger
from editflow.registry.store import Registry
from editflow.registry.versions import aliases_of, versions_of
from editflow.stats.cache import remove_stale_temp_files


@pytest.mark.slow
@pytest.mark.parametrize("step", ["after_stats", "after_edit"])
def test_killed_edit_leaves_nothing_half_done(lineage, step):  # noqa: F811
    reg = Registry()
    prod, history = aliases_of(reg, "tiny")["production"], ledger.production_history(reg, "tiny")
    known = {int(v.version) for v in versions_of(reg, "tiny", include_pending=True)}
    out = cli(lineage, *edit_args(lineage), crash=step)
    assert out.returncode == -9, out.stderr[-2000:]
    assert {int(v.version) for v in versions_of(reg, "tiny", include_pending=True)} == known
    assert aliases_of(reg, "tiny")["production"] == prod and ledger.production_history(reg, "tiny") == history
    report = integrity.repair(reg, "tiny")
    assert len(report.failed_runs) == 1
    run = reg.client.get_run(report.failed_runs[0])
    assert run.info.status == "FAILED" and "orphaned" in run.data.tags["editflow.error"]
    consistent("tiny")


def test_stale_temporary_files_are_removed_and_fresh_ones_kept(tmp_path):
    stale, fresh = tmp_path / "ab" / ".entry.npz.x1.tmp", tmp_path / "ab" / ".entry.npz.x2.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"half")
    fresh.write_bytes(b"being written")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert not stale.exists() and fresh.exists()
