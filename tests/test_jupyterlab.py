"""JupyterLab as a reader uses it, and what an executed smoke notebook shows in its outputs.

Cheapest first (the notebooks run through run_all.sh and the browser are the slow tier: ./run_tests.sh --all):

* The kernel: every notebook names ``python3``, the environment's own kernel (ipykernel installs it), which a
  Jupyter started from the environment resolves to the environment's Python, ahead of a user-wide kernel of
  that name. Committed notebooks keep no papermill ``injected-parameters`` cell (it would undo a reader's edit
  of the ``parameters`` cell) and name the kernel as ipykernel does (tools/tidy_notebook.py).
* Every notebook executed as ``run_all.sh --profile smoke`` executes it: no error, no warning and no stderr
  text in its outputs other than progress bars, and progress as text, not widgets (papermill saves no widget
  state, so a widget in an executed notebook is a bar frozen at 0%).
* A real browser: ``jupyter lab notebooks/`` from the environment on 127.0.0.1 with a token, on a copy of the
  notebooks (the repository's are never saved over) with ``$LOSSGRAD_RUNS`` in a temporary folder, driven in
  headless Chromium by Selenium. Notebook 04 (committed outputs) and the first notebook without committed
  outputs are opened, switched to the smoke profile by editing the ``parameters`` cell and run with Run > Run
  All Cells; then no error or warning may show in the page, every figure cell must show an image, a progress
  widget must have rendered, and the results must be under ``$LOSSGRAD_RUNS``. A screenshot of each notebook
  and the server's log go to build/test-artifacts/jupyterlab/ (``$LOSSGRAD_TEST_ARTIFACTS`` moves it). Without
  Chromium and chromedriver (Debian: ``apt-get install chromium chromium-driver``; .ci/run installs them when
  it can) or selenium, the browser tests skip and say why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from browser import headless_chromium
from notebook_checks import WARNING, WIDGET_VIEW, output_problems, reproducible_env
from notebook_checks import not_progress as _not_progress
from notebook_checks import where as _where

# The kernel and tidy checks and the progress-text parser are fast; running every notebook through run_all.sh
# and the browser are the slow tier (./run_tests.sh --all), marked one by one below.
REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
ARTIFACTS = Path(os.environ.get("LOSSGRAD_TEST_ARTIFACTS", REPO / "build" / "test-artifacts")) / "jupyterlab"


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _tags(cell) -> list:
    return cell.metadata.get("tags", [])


def _figure_cell(cell) -> bool:
    return cell.cell_type == "code" and "plt.show()" in cell.source


# ---------------------------------------------------------------- the kernel, without a browser
def test_every_notebook_names_the_environments_kernel():
    assert NOTEBOOKS
    wrong = {p.name: _read(p).metadata.get("kernelspec", {}).get("name") for p in NOTEBOOKS}
    wrong = {name: kernel for name, kernel in wrong.items() if kernel != "python3"}
    assert not wrong, f"notebooks that name another kernel than python3 (the environment's own): {wrong}"


def test_python3_resolves_to_this_environments_python_ahead_of_a_user_kernel(tmp_path):
    """What JupyterLab and papermill started from the environment launch for a notebook naming python3, when
    the user also has a python3 kernel of another Python in their own Jupyter folder."""
    user_kernel = tmp_path / "user-data" / "kernels" / "python3"
    user_kernel.mkdir(parents=True)
    (user_kernel / "kernel.json").write_text(json.dumps(
        {"argv": ["/nonexistent/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
         "display_name": "another Python", "language": "python"}))
    code = ("import json, sys\n"
            "from jupyter_client.kernelspec import KernelSpecManager\n"
            "from jupyter_client.manager import KernelManager\n"
            "spec = KernelSpecManager().get_kernel_spec('python3')\n"
            "print(json.dumps(dict(dir=spec.resource_dir, argv0=KernelManager(kernel_name='python3')"
            ".format_kernel_cmd()[0], python=sys.executable, prefix=sys.prefix)))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("JUPYTER_PATH", "JUPYTER_PREFER_ENV_PATH")}
    env["JUPYTER_DATA_DIR"] = str(tmp_path / "user-data")
    out = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True, timeout=120).stdout)
    assert Path(out["dir"]).is_relative_to(out["prefix"]), out
    assert out["argv0"] == out["python"], out


def test_committed_notebooks_keep_no_injected_parameters_and_name_the_kernel_as_ipykernel_does():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "tidy_notebook.py"), "--check", *map(str, NOTEBOOKS)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (
        "committed notebooks that JupyterLab would not open as it should (an injected-parameters cell undoes "
        "a reader's edit of the parameters cell; another kernel display name marks the notebook changed on "
        "opening); fix: .venv/bin/python tools/tidy_notebook.py notebooks/*.ipynb\n" + result.stdout + result.stderr)


def test_tidy_notebook_removes_only_an_injected_cell_that_repeats_the_defaults():
    spec = importlib.util.spec_from_file_location("tidy_notebook", REPO / "tools" / "tidy_notebook.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    def notebook(injected: str):
        cells = [nbformat.v4.new_code_cell('profile = "paper"  # smoke | quick | paper\noverrides = {}'),
                 nbformat.v4.new_code_cell(injected), nbformat.v4.new_code_cell("print(profile)")]
        cells[0].metadata["tags"], cells[1].metadata["tags"] = ["parameters"], ["injected-parameters"]
        nb = nbformat.v4.new_notebook(cells=cells)
        nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
        return nb

    nb = notebook('# Parameters\noverrides = {}\nprofile = "paper"\n')
    changes = tool.tidy(nb)
    assert [c.source for c in nb.cells][1:] == ["print(profile)"] and len(changes) == 2
    assert nb.metadata["kernelspec"] == tool.KERNELSPEC and tool.tidy(nb) == []
    with pytest.raises(ValueError, match="other parameters"):
        tool.tidy(notebook('# Parameters\nprofile = "quick"\n'))


# ---------------------------------------------------------------- executed smoke notebooks (papermill)
@pytest.mark.slow  # each notebook through run_all.sh (the fast tier's tests/test_notebooks.py checks the outputs too)
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_executed_smoke_notebook_has_no_warning_or_stderr_in_its_outputs(notebook, tmp_path):
    """``run_all.sh --profile smoke NN`` as a user runs it (results under a temporary $LOSSGRAD_RUNS)."""
    watched = [p for p in (REPO / "figures").rglob("*") if p.is_file()] + [notebook]
    before = {p: p.stat().st_mtime_ns for p in watched}
    result = subprocess.run([str(REPO / "run_all.sh"), "--profile", "smoke", notebook.stem], cwd=REPO,
                            env={**os.environ, **reproducible_env(), "LOSSGRAD_RUNS": str(tmp_path)},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    executed = tmp_path / "smoke" / "notebooks" / notebook.name
    problems = output_problems(_read(executed))
    assert not problems, f"{executed}:\n" + "\n".join(problems)
    assert any((tmp_path / "smoke" / "figures").iterdir()), "the notebook wrote no figure or table"
    assert {p: p.stat().st_mtime_ns for p in watched} == before, "a smoke run touched figures/ or the notebook"


def test_progress_bar_text_is_told_apart_from_other_stderr():
    bars = ("LOSSGRAD seed 0:  42%|####2     | 5/12 [00:01<00:02,  2.91it/s]\r"
            "LOSSGRAD seed 0: 100%|██████████| 12/12 [00:03<00:00,  3.5it/s, epoch 2/2 loss 0.1]\n"
            "04_fmnist runs: 3run [00:02, 1.2run/s]")
    assert _not_progress(bars) == []
    warning = "/x/train.py:12: UserWarning: something\n  warnings.warn(\n"
    assert len(_not_progress(bars + warning)) == 2
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("fit()", outputs=[
        nbformat.v4.new_output("stream", name="stderr", text=bars),
        nbformat.v4.new_output("stream", name="stdout", text="TqdmWarning: IProgress not found\n"),
        nbformat.v4.new_output("display_data", data={WIDGET_VIEW: {"model_id": "1"}, "text/plain": "  0%| | 0/4"}),
    ])])
    problems = output_problems(nb)
    assert len(problems) == 2 and "TqdmWarning" in problems[0] and "widget" in problems[1], problems
    problems = output_problems(nb, widgets=True)  # as tests/test_notebooks.py runs them: bars are widgets
    assert len(problems) == 1 and "TqdmWarning" in problems[0], problems


# ---------------------------------------------------------------- a real browser
@dataclass
class Lab:
    url: str
    token: str
    folder: Path  # the copy of the repository layout JupyterLab serves
    runs: Path  # $LOSSGRAD_RUNS of its kernels
    log: Path

    def api(self, path: str, method: str = "GET", data: bytes | None = None):
        request = urllib.request.Request(f"{self.url}/api/{path}", method=method, data=data,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium under Selenium; skips, saying why, when either is missing or Chromium cannot start."""
    yield from headless_chromium("JupyterLab browser test", "./run_tests.sh --all -k jupyterlab")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(browser, tmp_path_factory):
    """``jupyter lab notebooks/`` from this environment, as the README starts it, on a copy of the notebooks."""
    root = tmp_path_factory.mktemp("jupyterlab")
    folder = root / "lossgrad"
    (folder / "notebooks").mkdir(parents=True)
    for notebook in NOTEBOOKS:
        shutil.copy(notebook, folder / "notebooks")
    for name in ("companion", "lossgrad.py"):  # the notebooks import them from ".." of their folder
        (folder / name).symlink_to(REPO / name)
    jupyter = root / "jupyter"  # config, data, runtime, settings and workspaces of this server only
    notifications = jupyter / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notifications.parent.mkdir(parents=True)
    notifications.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))  # no news toast
    env = {**os.environ, **reproducible_env(), "LOSSGRAD_RUNS": str(root / "runs"),
           "JUPYTER_CONFIG_DIR": str(jupyter / "config"), "JUPYTER_DATA_DIR": str(jupyter / "data"),
           "JUPYTER_RUNTIME_DIR": str(jupyter / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(jupyter / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(jupyter / "workspaces")}
    port, token = _free_port(), secrets.token_hex(16)
    command = [str(Path(sys.executable).with_name("jupyter")), "lab", "notebooks/", "--no-browser",
               "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}"]
    if os.geteuid() == 0:
        command.append("--allow-root")
    log = root / "jupyterlab.log"
    with open(log, "w") as out:
        server = subprocess.Popen(command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    started = Lab(f"http://127.0.0.1:{port}", token, folder, root / "runs", log)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                started.api("status")
                break
            except (urllib.error.URLError, ConnectionError):
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not start: {log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield started
    finally:
        server.send_signal(signal.SIGTERM)  # the server shuts its kernels down
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(log, ARTIFACTS / "jupyterlab.log")


def _first_without_outputs() -> list[Path]:
    return [p for p in NOTEBOOKS
            if not any(c.get("outputs") for c in _read(p).cells) and any(map(_figure_cell, _read(p).cells))][:1]


BROWSER_NOTEBOOKS = [p for p in NOTEBOOKS if p.name.startswith("04_")] + _first_without_outputs()

# the open notebook's cells: kind, prompt, images, stderr outputs (JupyterLab renders errors as stderr too) and
# all output text
CELLS_JS = """
const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
if (!panel) return null;
return Array.from(panel.querySelectorAll('.jp-Notebook .jp-Cell')).map(c => ({
  code: c.classList.contains('jp-CodeCell'),
  prompt: c.classList.contains('jp-CodeCell') ? (c.querySelector('.jp-InputArea-prompt') || {}).textContent : null,
  images: c.querySelectorAll('.jp-OutputArea img').length,
  stderr: Array.from(c.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
    .map(e => e.textContent),
  text: Array.from(c.querySelectorAll('.jp-OutputArea-output')).map(e => e.textContent).join('\\n'),
}));
"""
# counts progress widgets as they are rendered (per-run bars are removed when their run ends)
WATCH_PROGRESS_JS = """
window.__lossgradProgress = 0;
new MutationObserver(() => {
  if (document.querySelector('.jp-NotebookPanel .jp-OutputArea .widget-hprogress, '
                             + '.jp-NotebookPanel .jp-OutputArea .widget-progress')) window.__lossgradProgress++;
}).observe(document.body, {childList: true, subtree: true});
"""


def _wait(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _session(lab: Lab, path: str):
    return next((s for s in lab.api("sessions") if s["path"] in (path, f"notebooks/{path}")), None)


@pytest.mark.slow  # JupyterLab in headless Chromium: ./run_tests.sh --all
@pytest.mark.parametrize("notebook", BROWSER_NOTEBOOKS, ids=[p.stem for p in BROWSER_NOTEBOOKS])
def test_run_all_in_jupyterlab_with_the_smoke_profile(notebook, browser, lab):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    nb = _read(notebook)
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    parameters = next(i for i, c in enumerate(nb.cells) if "parameters" in _tags(c))
    figures = [i for i, c in enumerate(nb.cells) if _figure_cell(c)]
    shot = ARTIFACTS / f"{notebook.stem}.png"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        # open it as a reader does (a fresh workspace: nothing else open)
        browser.get(f"{lab.url}/lab/tree/{notebook.name}?reset&token={lab.token}")
        cells = _wait(lambda: (lambda c: c if c and len(c) == len(nb.cells) and sum(x["code"] for x in c) == n_code
                               else None)(browser.execute_script(CELLS_JS)), 120,
                      "every cell of the notebook in the page")  # JupyterLab renders them in batches
        session = _wait(lambda: (lambda s: s if s and s["kernel"]["execution_state"] == "idle" else None)(
            _session(lab, notebook.name)), 120, "the notebook's kernel to start")
        # the kernel: the one the notebook names, started without asking the reader
        assert session["kernel"]["name"] == nb.metadata["kernelspec"]["name"] == "python3", session
        assert not browser.find_elements(By.CSS_SELECTOR, ".jp-Dialog"), \
            "a dialog opened with the notebook: " + browser.find_element(By.CSS_SELECTOR, ".jp-Dialog").text

        # the smoke profile, chosen in the parameters cell
        cell = browser.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Notebook .jp-Cell")[parameters]
        editor = cell.find_element(By.CSS_SELECTOR, ".cm-content")
        editor.click()
        (ActionChains(browser).key_down(Keys.CONTROL).send_keys(Keys.HOME).key_up(Keys.CONTROL)
         .send_keys(Keys.END).key_down(Keys.SHIFT).send_keys(Keys.HOME).key_up(Keys.SHIFT)
         .send_keys('profile = "smoke"').perform())
        first_line = browser.execute_script("return arguments[0].querySelector('.cm-line').textContent", editor)
        assert first_line == 'profile = "smoke"', f"the parameters cell's first line reads {first_line!r}"

        # Run > Run All Cells
        browser.execute_script(WATCH_PROGRESS_JS)
        browser.find_element(By.XPATH, "//div[contains(@class, 'lm-MenuBar-itemLabel') and text()='Run']").click()
        browser.find_element(By.CSS_SELECTOR, "li.lm-Menu-item[data-command='runmenu:run-all']").click()
        clicked = time.monotonic()
        seen_running = False
        while True:
            cells = browser.execute_script(CELLS_JS)
            running = any(c["code"] and "*" in (c["prompt"] or "") for c in cells)
            seen_running |= running
            profile = next((m.group(1) for c in cells for m in [re.search(r"Settings\(profile='(\w+)'", c["text"])]
                            if m), None)
            if profile not in (None, "smoke"):
                lab.api(f"kernels/{session['kernel']['id']}/interrupt", method="POST", data=b"")
                pytest.fail(f"the notebook ran the {profile!r} profile after the parameters cell was set to "
                            f"'smoke': a later cell sets the profile again (papermill's injected-parameters cell? "
                            f"tools/tidy_notebook.py removes it)")
            if not running and (seen_running or time.monotonic() - clicked > 5) and \
                    _session(lab, notebook.name)["kernel"]["execution_state"] == "idle":
                break
            if time.monotonic() - clicked > 600:
                lab.api(f"kernels/{session['kernel']['id']}/interrupt", method="POST", data=b"")
                pytest.fail("Run All did not finish in 600 s")
            time.sleep(0.5)
        ran_for = time.monotonic() - clicked

        # what the reader sees
        problems = []
        for i, c in enumerate(cells):
            where = _where(i, nb.cells[i])
            if c["code"] and not re.fullmatch(r"\[\d+\]:", (c["prompt"] or "").strip()):
                problems.append(f"{where}: not run (prompt {c['prompt']!r})")
            for rest in filter(None, map(_not_progress, c["stderr"])):
                kind = "an error" if any(re.search(r"Traceback|^\w*(Error|Exception)\b", r) for r in rest) \
                    else "stderr text that is not a progress bar"
                problems.append(f"{where}: {kind}: {chr(10).join(rest)[:1500]}")
            match = WARNING.search(c["text"])
            if match:
                problems.append(f"{where}: a warning in the page: {c['text'][max(0, match.start() - 120):][:400]!r}")
            if "Error displaying widget" in c["text"]:
                problems.append(f"{where}: a widget did not render: {c['text'][:300]!r}")
            if i in figures and not c["images"]:
                problems.append(f"{where}: a figure cell shows no image")
        dialogs = browser.find_elements(By.CSS_SELECTOR, ".jp-Dialog")
        problems += [f"a dialog is open: {d.text[:300]!r}" for d in dialogs]
        if not browser.execute_script("return window.__lossgradProgress"):
            problems.append("no progress widget rendered while the runs trained")
        if not list((lab.runs / "smoke" / "figures").glob(f"{notebook.stem[:2]}_*")):
            problems.append(f"no figure or table of this notebook under $LOSSGRAD_RUNS/smoke/figures ({lab.runs})")
        assert not problems, f"{notebook.name} in JupyterLab (screenshot {shot}):\n" + "\n".join(problems)
        print(f"{notebook.name}: opened, switched to smoke and Run All in {time.monotonic() - started:.0f} s "
              f"(Run All {ran_for:.0f} s); screenshot {shot}")
    finally:
        with contextlib.suppress(Exception):  # never hide the test's own failure
            if figures:  # the screenshot shows the first figure
                browser.execute_script("const c = document.querySelectorAll('.jp-NotebookPanel .jp-Cell')"
                                       "[arguments[0]]; if (c) c.scrollIntoView();", figures[0])
            browser.save_screenshot(str(shot))
        with contextlib.suppress(Exception):
            session = _session(lab, notebook.name)
            if session:  # shut its kernel down; the copy is not saved
                lab.api(f"sessions/{session['id']}", method="DELETE")
