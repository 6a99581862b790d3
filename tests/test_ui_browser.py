"""The decision as a person sees it: headless Chromium (Debian's chromium and chromedriver, driven by
selenium) against ``editflow ui`` after a two-version quick start (``editflow edit`` of three facts into
the bundled default model). The registered model's page lists both versions with their aliases and the
gate's decision; the edit's run shows the per-fact table (before and after side by side) and the
before/after figure, byte for byte the PNG editflow logged. Screenshots go to the test's tmp folder and
to /tmp/ui_shots/.

Skipped without /usr/bin/chromium, /usr/bin/chromedriver or selenium, unless EDITFLOW_REQUIRE_BROWSER=1
(then it fails: CI installs them)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from _processes import free_port, stop_group, wait_healthy

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SHOTS = Path("/tmp/ui_shots")
REPO = Path(__file__).resolve().parents[1]
NAME = "editflow-default"
FIGURE = "eval/prob_new_pre_vs_post.png"
N_FACTS = 3
#: Chromium on a closed network: without the background-networking flags it waits on the network.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
WAIT = 90  # seconds for the single-page app to render an element (2 busy CPU cores)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _browser_present():
    """Skip (or, with EDITFLOW_REQUIRE_BROWSER=1, fail) before the quick start when there is no browser."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        reason = (
            "no browser for the UI check: missing " + ", ".join(missing) + " (apt-get install chromium chromium-driver)"
        )
        if os.environ.get("EDITFLOW_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + "; EDITFLOW_REQUIRE_BROWSER=1")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """``editflow edit facts.json`` (three facts of examples/facts.json, fast settings) in a fresh
    directory: the bundled model becomes version 1 (production), the edit version 2."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("ui_quickstart")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "EDITFLOW_CACHE": str(root / "cache"),
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "EDITFLOW_QUIET": "1",
        "OMP_NUM_THREADS": "1",
    }
    facts = json.loads((REPO / "examples" / "facts.json").read_text())[:N_FACTS]
    (root / "facts.json").write_text(json.dumps(facts, indent=1))
    edit = [
        *("edit", "facts.json", "--json", "--no-fluency", "--stats-tokens", "5000"),
        *("--hparams", "v_num_grad_steps=20"),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "editflow.cli", *edit], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode in (0, 3), proc.stderr[-3000:]  # 3: registered, the gate kept it a candidate
    out = json.loads(proc.stdout)
    assert (out["name"], out["version"], out["parent_version"]) == (NAME, 2, 1)
    assert (proc.returncode == 3) == (not out["gate"]["passed"] and not out["promoted"])
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = {v: client.get_model_version(NAME, str(v)) for v in (1, 2)}
    aliases = {
        v: sorted(a for a, n in client.get_registered_model(NAME).aliases.items() if int(n) == v) for v in (1, 2)
    }
    assert "candidate" in aliases[2] and "production" in aliases[1 if not out["promoted"] else 2]
    return {"root": root, "env": env, "out": out, "client": client, "versions": versions, "aliases": aliases}


@pytest.fixture(scope="module")
def ui(quickstart):
    """``editflow ui`` on the quick start's store, on 127.0.0.1 and a free port; its URL."""
    port, log = free_port(), quickstart["root"] / "ui.log"
    cmd = [sys.executable, "-m", "editflow.cli", "ui", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd,
            cwd=quickstart["root"],
            env=quickstart["env"],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/health", proc, log)
        yield url
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def browser(ui):
    """Headless Chromium with a fresh profile and a laptop's window (1600 px wide), MLflow's assistant
    panel closed (it covers a third of the page)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="editflow-chromium-")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1600,1100"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    try:
        driver.set_page_load_timeout(WAIT)
        driver.set_script_timeout(WAIT)
        driver.get(f"{ui}/#/")
        driver.execute_script(
            "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
            "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
        )
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# ----------------------------------------------------------------------------- helpers


def literal(text: str) -> str:
    """``text`` as an XPath 1.0 string literal."""
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    return "concat(" + ', "\'", '.join(f"'{part}'" for part in text.split("'")) + ")"


def has_text(text: str, exact: bool = False) -> str:
    """XPath: an element with a text node of its own that contains (or is) ``text``."""
    test = f"normalize-space(.) = {literal(text)}" if exact else f"contains(normalize-space(.), {literal(text)})"
    return f".//*[text()[{test}]]"


def shown(scope, xpath: str, timeout: float = WAIT):
    """The first displayed element at ``xpath`` under ``scope`` (a driver or an element), waiting for
    the single-page app to render it."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = getattr(scope, "parent", scope)
    return WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda _: next((e for e in scope.find_elements(By.XPATH, xpath) if e.is_displayed()), False),
        message=f"nothing displayed at {xpath}",
    )


def shoot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), path
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SHOTS / name)
    return path


def on_screen(driver, element) -> bool:
    """``element`` is where a person sees it: its centre is inside the window and nothing (a scrolling
    box that clips it, an overlay) is drawn over it there."""
    return driver.execute_script(
        "const e = arguments[0], r = e.getBoundingClientRect();"
        "const x = r.left + r.width / 2, y = r.top + r.height / 2;"
        "if (r.width === 0 || x < 0 || y < 0 || x > innerWidth || y > innerHeight) return false;"
        "const hit = document.elementFromPoint(x, y);"
        "return hit !== null && (hit === e || e.contains(hit));",
        element,
    )


def tag_chip(row, key: str):
    """The ``key: value`` chip of a version's tag in its row of the model page."""
    return shown(row, f"{has_text(key, exact=True)}/..")


def version_row(driver, version: int):
    return shown(driver, f"//div[@role='row'][.//a[normalize-space(.)='Version {version}']]")


# ----------------------------------------------------------------------------- what a person sees


def test_model_page_lists_both_versions_with_aliases_and_the_gate_decision(quickstart, ui, browser, tmp_path):
    versions, aliases, out = quickstart["versions"], quickstart["aliases"], quickstart["out"]
    decision = versions[2].tags["editflow.gate"]  # "passed" or "failed: <reasons>"
    assert decision == ("passed" if out["gate"]["passed"] else "failed: " + "; ".join(out["gate"]["reasons"]))
    headline = "Gate " + decision.split(":")[0]  # what the version's description starts with
    assert versions[2].description.startswith(headline)

    browser.set_window_size(1600, 1300)  # both versions' rows (each lists its tags) in one screenshot
    browser.get(f"{ui}/#/models/{NAME}")
    shown(browser, has_text(NAME, exact=True))
    for v in (1, 2):
        row = version_row(browser, v)
        for alias in aliases[v]:  # the alias chip, "@ production" / "@ candidate"
            assert on_screen(browser, shown(row, has_text(alias, exact=True))), alias
        assert tag_chip(row, "editflow.role").text.endswith("base" if v == 1 else "edit")
    row = version_row(browser, 2)
    description = shown(row, f".//div[@role='cell']//*[text()[starts-with(normalize-space(.), {literal(headline)})]]")
    assert on_screen(browser, description), description.text
    chip = tag_chip(row, "editflow.gate").text  # "editflow.gate: failed: ..." (cut to the column's width)
    assert "".join(chip.split()).startswith("editflow.gate:" + decision.split(":")[0])
    assert headline not in version_row(browser, 1).text  # the base was never gated
    shot = shoot(browser, tmp_path, "model_page.png")
    assert shot.stat().st_size > 10_000
    browser.set_window_size(1600, 1100)

    # The version's own page has the decision in full, with the reasons, and links the edit's run.
    browser.get(f"{ui}/#/models/{NAME}/versions/2")
    assert on_screen(browser, shown(browser, has_text(versions[2].description.splitlines()[0], exact=True)))
    for alias in aliases[2]:
        shown(browser, has_text(alias, exact=True))
    link = shown(browser, f"//a[contains(@href, '/runs/{out['run_id']}')]")
    assert link.text.startswith(f"edit {N_FACTS} facts")  # the run's name says what it did
    shoot(browser, tmp_path, "version_page.png")


def test_edit_run_shows_the_per_fact_table_and_the_figure(quickstart, ui, browser, tmp_path):
    run_id, client = quickstart["out"]["run_id"], quickstart["client"]
    facts = json.loads((quickstart["root"] / "facts.json").read_text())

    # From the version's page to its source run, as a person would go, then to the run's artifacts.
    browser.get(f"{ui}/#/models/{NAME}/versions/2")
    shown(browser, f"//a[contains(@href, '/runs/{run_id}')]").click()
    shown(browser, "//button[@role='tab'][normalize-space(.)='Artifacts']").click()
    assert f"/runs/{run_id}/artifacts" in browser.current_url
    shown(browser, "//div[text()[normalize-space(.)='eval']]").click()
    shown(browser, "//div[text()[normalize-space(.)='facts.json']]").click()

    # The per-fact table (mlflow.log_table): one row per fact, P(new) before and after in view.
    shown(browser, has_text("View as table", exact=True))
    for fact in facts:
        row = shown(browser, f"//div[@role='row'][.//*[text()[normalize-space(.)={literal(fact['subject'])}]]]")
        for key in ("target_new", "target_true"):
            shown(row, has_text(fact[key], exact=True))
    header = shown(browser, "//div[@role='row'][.//*[text()[normalize-space(.)='subject']]]")
    for column in ("subject", "target_new", "target_true", "pre_p_new", "post_p_new"):
        cell = shown(header, has_text(column, exact=True))
        assert on_screen(browser, cell), f"column {column} is not in view without scrolling"
    shoot(browser, tmp_path, "run_facts_table.png")

    # The before/after figure: in view at a readable size, byte for byte the PNG editflow logged.
    shown(browser, f"//div[text()[normalize-space(.)={literal(Path(FIGURE).name)}]]").click()
    shown(browser, has_text(FIGURE, exact=True))
    img = shown(browser, "//img[starts-with(@src, 'blob:')]")
    size = browser.execute_script("const i = arguments[0]; return [i.complete, i.naturalWidth, i.width];", img)
    assert size[0] and size[1] > 0 and size[2] >= 600 and on_screen(browser, img), size
    shown_png = base64.b64decode(
        browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => {"
            "  let s = ''; new Uint8Array(b).forEach(c => { s += String.fromCharCode(c); }); done(btoa(s)); });",
            img.get_attribute("src"),
        )
    )
    logged = Path(client.download_artifacts(run_id, FIGURE, str(tmp_path)))
    assert hashlib.sha256(shown_png).hexdigest() == hashlib.sha256(logged.read_bytes()).hexdigest()
    shoot(browser, tmp_path, "run_figure.png")
