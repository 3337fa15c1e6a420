"""Every code block of README.md (and of the docs pages with runnable examples) runs as
written, in order, in one scratch folder per page.

``python`` blocks run each in a fresh interpreter; ``bash`` blocks run with ``drm-merge`` on
``PATH`` (the two fresh-machine set-up commands, right after ``<!-- main-command -->`` and
``<!-- test-command -->``, are only checked to be there); ``yaml`` blocks are parsed, written
to the file their first line names (``# merge.yaml``) so that later blocks can use them, and
merge configs are loaded with :func:`drm_lightning.config.load_config`. Blocks share the
folder, so a block may use the files an earlier one wrote. The relative links of the README,
``docs/`` and ``benchmarks/RESULTS.md`` must point at files of the repository.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from drm_lightning.config.loading import load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SETUP_MARKERS = ("<!-- main-command -->", "<!-- test-command -->")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
YAML_NAME = re.compile(r"#\s*([\w.-]+\.ya?ml)\s*$")
TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    """One fenced code block: its language, text, README line and set-up marker (if any)."""

    lang: str
    code: str
    line: int
    marker: str | None


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of ``text`` in order, each with the marker on the line before it."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        line = text.count("\n", 0, match.start()) + 1
        marker = before if before in SETUP_MARKERS else None
        blocks.append(Block(match.group(1), match.group(2), line, marker))
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
RUNNABLE = ("README.md", "docs/transformers.md", "docs/methods.md")
"""Pages whose every code block runs as written (other docs hold fragments and references)."""
RUN = {
    page: [b for b in readme_blocks((ROOT / page).read_text(encoding="utf-8")) if b.marker is None]
    for page in RUNNABLE
}
CASES = [(page, i) for page in RUNNABLE for i in range(len(RUN[page]))]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(OMP_NUM_THREADS="1", DRM_LIGHTNING_CACHE="off", PYTHONUNBUFFERED="1")
    return env


def _run_block(index: int, block: Block, workdir: Path) -> str:
    """Run one block in ``workdir``; returns '' on success, else what went wrong."""
    if block.lang == "python":
        script = workdir / f"readme_block_{index}.py"
        script.write_text(block.code, encoding="utf-8")
        cmd = [sys.executable, str(script)]
    elif block.lang == "bash":
        cmd = ["bash", "-euo", "pipefail", "-c", block.code]
    elif block.lang == "yaml":
        return _check_yaml(index, block, workdir)
    else:
        return f"no runner for a ```{block.lang} block"
    proc = subprocess.run(
        cmd, check=False, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    if proc.returncode != 0:
        return (
            f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n"
            f"--- stderr\n{proc.stderr[-3000:]}"
        )
    return ""


def _check_yaml(index: int, block: Block, workdir: Path) -> str:
    data = yaml.safe_load(block.code)
    if not isinstance(data, dict):
        return "not a YAML mapping"
    first = block.code.splitlines()[0]
    named = YAML_NAME.fullmatch(first.strip())
    path = workdir / (named.group(1) if named else f"readme_block_{index}.yaml")
    path.write_text(block.code, encoding="utf-8")
    if "method" in data or "merge_method" in data:
        cwd = Path.cwd()
        os.chdir(workdir)  # config paths are relative to the current directory
        try:
            load_config(path.name)
        except Exception as err:  # noqa: BLE001 - reported as the block's failure
            return f"{type(err).__name__}: {err}"
        finally:
            os.chdir(cwd)
    return ""


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, int], str]:
    """Runs each page's blocks in order, each once, up to the one a test asks for."""
    workdirs = {page: tmp_path_factory.mktemp(Path(page).stem) for page in RUNNABLE}
    results: dict[str, list[str]] = {page: [] for page in RUNNABLE}

    def run_up_to(page: str, index: int) -> str:
        done = results[page]
        while len(done) <= index:
            done.append(_run_block(len(done), RUN[page][len(done)], workdirs[page]))
        return done[index]

    return run_up_to


def test_setup_commands_present() -> None:
    """The two fresh-machine commands stay where .ci/run and newcomers find them."""
    for marker in SETUP_MARKERS:
        found = [b for b in BLOCKS if b.marker == marker]
        assert len(found) == 1 and found[0].lang == "bash", f"one ```bash block after {marker}"
        assert found[0].code.count("\n") == 1 and "pip install" in found[0].code


@pytest.mark.parametrize("page", RUNNABLE)
def test_every_block_has_a_runner(page: str) -> None:
    assert RUN[page], f"{page} has no code blocks to run"
    assert {b.lang for b in RUN[page]} <= {"python", "bash", "yaml"}, [b.lang for b in RUN[page]]


def test_readme_is_short() -> None:
    """The README is the newcomer's path (about 200 lines); reference lives in docs/."""
    assert README.read_text(encoding="utf-8").count("\n") <= 210


@pytest.mark.parametrize(
    ("page", "index"), CASES, ids=[f"{p}-{RUN[p][i].lang}-line{RUN[p][i].line}" for p, i in CASES]
)
def test_readme_block_runs(page: str, index: int, runner: Callable[[str, int], str]) -> None:
    """The block at line N of the page runs as written (after every block above it)."""
    block = RUN[page][index]
    assert "..." not in block.code, f"{page} line {block.line}: elided code"
    error = runner(page, index)
    assert not error, f"{page} line {block.line} (```{block.lang}) failed: {error}"


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize(
    "doc",
    ["README.md", "benchmarks/RESULTS.md"]
    + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
)
def test_relative_links_resolve(doc: str) -> None:
    path = ROOT / doc
    missing = [
        target
        for target in LINK.findall(path.read_text(encoding="utf-8"))
        if "://" not in target and not (path.parent / target).exists()
    ]
    assert not missing, f"{doc}: links to missing files {missing}"
