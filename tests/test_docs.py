"""The documentation: the MkDocs site builds with no warning (so no link or anchor is dead), the README's links
resolve, the README's tour is lines of the walk-throughs, the Layout names every module, and the walk-throughs
themselves (the quick start and the fleet) run as scripts.

A walk-through is every fenced block that follows a ``<!-- walkthrough: NAME -->`` comment in a page, in page
order: ``bash`` blocks run as they are, ``python`` blocks through the venv's ``python``. The test runs the text of
the page, so the commands shown cannot drift from what works. The ports the pages show (Ollama's 11434, the
control plane's 11500, the registry's 5000) are replaced by free ones, and every process the script starts is
stopped at the end (a trap, then its whole process group). The script runs under `bash -x` with times, so a
failure shows which command and when.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
VENV_BIN = Path(sys.executable).parent
MARK = re.compile(r"<!-- walkthrough: ([\w-]+) -->\s*\n```(bash|python)\n(.*?)```", re.DOTALL)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def walkthrough(name: str) -> list[tuple[str, str]]:
    """The (language, text) blocks of walk-through ``name``, across the pages, in page order."""
    blocks = []
    for page in sorted(DOCS.glob("*.md")):
        blocks += [(lang, text) for found, lang, text in MARK.findall(page.read_text()) if found == name]
    return blocks


def script_of(blocks: list[tuple[str, str]], ports: dict[int, int]) -> str:
    parts = ["set -euo pipefail", "PS4='+ $(date +%T) '", "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT"]
    for lang, text in blocks:
        parts.append(text if lang == "bash" else f"python - <<'PY'\n{text}PY")
    script = "\n".join(parts) + "\n"
    for shown, free in ports.items():
        script = re.sub(rf"\b{shown}\b", str(free), script)
    return script


def run_walkthrough(name: str, tmp_path: Path, timeout: float = 840) -> str:
    blocks = walkthrough(name)
    assert blocks, f"no <!-- walkthrough: {name} --> block in docs/"
    ports = {11434: free_port(), 11500: free_port(), 5000: free_port()}
    script = tmp_path / f"{name}.sh"
    script.write_text(script_of(blocks, ports))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "SLMOPS_HOME": str(tmp_path / "home"), "SLMOPS_HOST": f"127.0.0.1:{ports[11434]}",
           "SLMOPS_FLEET_HOST": f"127.0.0.1:{ports[11500]}", "SLMOPS_CONFIG": "", "SLMOPS_FLEET_DB": "",
           "SLMOPS_FLEET_KEY": "", "SLMOPS_API_KEY": "", "COLUMNS": "200"}
    log = tmp_path / f"{name}.log"
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", "-x", str(script)], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            stop_group(proc)
    text = log.read_text()
    assert code == 0, (f"walk-through {name} {'timed out' if code is None else f'exited {code}'} after "
                       f"{time.monotonic() - started:.0f} s; its output:\n{text[-6000:]}")
    return text


def stop_group(proc: subprocess.Popen) -> None:
    """Stop whatever the script left in its process group: TERM, then KILL what is still there after 15 s."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the script itself, so that only live members keep the group
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """`mkdocs build --strict`: a dead link or anchor, or a page left out of the nav, fails the build."""
    site = tmp_path / "site"
    command = [str(VENV_BIN / "mkdocs"), "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (site / "quickstart" / "index.html").exists()


def test_the_readme_links_resolve() -> None:
    text = (ROOT / "README.md").read_text()
    targets = [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert targets
    dead = [t for t in targets if not (ROOT / t.split("#")[0]).exists()]
    assert not dead, f"README.md links to missing files: {dead}"


def test_the_readme_tour_is_made_of_walkthrough_lines() -> None:
    """Each line of the tour's code blocks is a line a walk-through runs, so the tour cannot drift either."""
    readme = (ROOT / "README.md").read_text()
    tour = readme.split("## A short tour", 1)[1].split("\n## ", 1)[0]
    shown = [line.strip() for block in re.findall(r"```(?:bash|python)\n(.*?)```", tour, re.DOTALL)
             for line in block.splitlines() if line.strip()]
    assert len(shown) >= 8
    run = {line.strip() for name in ("quickstart", "fleet") for _, text in walkthrough(name)
           for line in text.splitlines()}
    missing = [line for line in shown if line not in run]
    assert not missing, f"README tour lines that no walk-through runs: {missing}"


def test_the_layout_names_every_module() -> None:
    layout = (DOCS / "architecture.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    entries = [p.name for p in (ROOT / "slmops").iterdir()
               if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "_lazy.py")]
    missing = [e for e in entries if f"slmops/{e}" not in layout]
    assert not missing, f"docs/architecture.md's Layout does not name: {missing}"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_quick_start_runs_as_written(tmp_path: Path) -> None:
    out = run_walkthrough("quickstart", tmp_path)
    assert "success" in out and "eval rate:" in out and "chat.completion" in out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_fleet_walkthrough_runs_as_written(tmp_path: Path) -> None:
    from registry import BINARY
    assert Path(BINARY).exists(), "docker-registry is missing: apt-get install -y docker-registry (.ci/run does)"
    out = run_walkthrough("fleet", tmp_path)
    assert '"release":"smol:1.1.0"' in out and "ledger intact" in out


def test_every_command_is_in_the_cli_page() -> None:
    done = subprocess.run([str(VENV_BIN / "slmops"), "--help"], capture_output=True, text=True, timeout=120,
                          check=False, env={**os.environ, "COLUMNS": "200"})
    commands = re.findall(r"^│ (\w+) ", done.stdout.split("Commands", 1)[1], re.MULTILINE)
    assert "pull" in commands and "fleet" in commands
    page = (DOCS / "cli.md").read_text()
    missing = [c for c in commands if f"`slmops {c}" not in page]
    assert not missing, f"docs/cli.md does not show: {missing}"


def test_every_setting_is_in_the_configuration_page(tmp_path: Path) -> None:
    done = subprocess.run([str(VENV_BIN / "slmops"), "env"], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "SLMOPS_HOME": str(tmp_path), "SLMOPS_CONFIG": ""})
    names = re.findall(r"^(SLMOPS_\w+)=", done.stdout, re.MULTILINE)
    assert "SLMOPS_HOME" in names, done.stdout + done.stderr
    page = (DOCS / "configuration.md").read_text()
    missing = [n for n in names if f"`{n}`" not in page]
    assert not missing, f"docs/configuration.md does not describe: {missing}"
