"""A rank that stops answering under ``torchrun`` is named on the others, which exit (issue 20).

Each multi-process test launches ``python -m torch.distributed.run --nproc_per_node 2`` on a
small script that runs ``drm-merge`` (or, for a group the user created, a bare ``Comm``) with
a hook that SIGSTOPs or SIGKILLs rank 1 at a chosen point. Rank 0 records when it returned;
the test checks the time, the message naming rank 1 and that no output was left, then kills
whatever is left of rank 1 (SIGCONT + SIGKILL) so nothing leaks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from drm_lightning.cli.command import main
from drm_lightning.distributed import comm as comm_module

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 5  # --timeout of the tests
SLACK_S = 40  # a loaded 2-core machine: imports, rendezvous, scheduling

RANK_SCRIPT = r'''
import os, signal, sys, time
from pathlib import Path

mode, where, marks = sys.argv[1], sys.argv[2], Path(sys.argv[3])
argv = sys.argv[4:]
rank = int(os.environ["RANK"])
(marks / f"rank{rank}.pid").write_text(str(os.getpid()))


def halt():
    """Rank 1 stops (SIGSTOP) or dies (SIGKILL) here."""
    (marks / "halted").write_text(f"{os.getpid()} {time.time()}")
    os.kill(os.getpid(), signal.SIGSTOP if mode == "stop" else signal.SIGKILL)


def hook(owner, name):
    real = getattr(owner, name)

    def hooked(*args, **kwargs):
        halt()
        return real(*args, **kwargs)

    setattr(owner, name, hooked)


if where == "user":  # a group the user created (in-loop merges): their timeout, our Comm
    import datetime
    import torch
    import torch.distributed as dist
    from drm_lightning.distributed.comm import Comm

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(argv[0])))
    comm = Comm(None)
    comm.all_reduce(torch.ones(2))
    if rank == 1:
        halt()
    try:
        comm.all_reduce(torch.ones(2))
        result = "0 no error"
    except Exception as err:
        result = f"2 {type(err).__name__}: {err}"
    dist.destroy_process_group()
    (marks / f"rank{rank}.done").write_text(f"{time.time()} {result}")
    sys.exit(int(result.split()[0]))

from drm_lightning.cli import command as cli
from drm_lightning.distributed import streaming
from drm_lightning.distributed.comm import Comm

if rank == 1 and where in ("merge", "busy"):  # after the plan, before rank 1's first tensor
    hook(streaming, "iter_merge")
elif rank == 0 and where == "busy":  # rank 0 still merging when the launcher stops it
    real_merge = streaming.iter_merge

    def slow_merge(*args, **kwargs):
        time.sleep(30)
        return real_merge(*args, **kwargs)

    streaming.iter_merge = slow_merge
elif rank == 1 and where == "send":  # rank 0 waits in a receive from rank 1
    hook(Comm, "send")
try:
    status = cli.main(argv)
except SystemExit as stop:
    status = stop.code
(marks / f"rank{rank}.done").write_text(f"{time.time()} {status}")
sys.exit(status)
'''


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base and two branches of seven small tensors, and a TIES config."""
    root = tmp_path_factory.mktemp("inputs")
    g = torch.Generator().manual_seed(0)
    shapes = {f"layers.{i}.weight": (24, 16) for i in range(6)} | {"norm.weight": (16,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    for folder in ("base", "b0", "b1"):
        (root / folder).mkdir()
        tensors = (
            base
            if folder == "base"
            else {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        )
        save_file(tensors, root / folder / "model.safetensors", metadata={"format": "pt"})
    config = {
        "method": "ties",
        "base": str(root / "base"),
        "branches": [str(root / "b0"), str(root / "b1")],
        "parameters": {"density": 0.5},
    }
    (root / "ties.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def _alive(pid: int, script: Path) -> bool:
    """Whether ``pid`` is still one of this test's rank processes (not a reused pid)."""
    try:
        return str(script) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _release(marks: Path, script: Path) -> None:
    """Kill the ranks this test launched that are still there (a stopped one included)."""
    for file in marks.glob("rank*.pid"):
        pid = int(file.read_text())
        if _alive(pid, script):
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break


class Launch:
    """One ``torchrun`` of the rank script; see :func:`launch`."""

    def __init__(self, root: Path, tmp_path: Path) -> None:
        self.root, self.tmp_path = root, tmp_path
        self.marks = tmp_path / "marks"
        self.marks.mkdir()
        self.script = tmp_path / "run_rank.py"
        self.script.write_text(RANK_SCRIPT)
        self.log = tmp_path / "torchrun.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, mode: str, where: str, *args: str) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
        env.pop("WORLD_SIZE", None)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            str(self.script),
            mode,
            where,
            str(self.marks),
            *args,
        ]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
            )

    def rank0_result(self, limit: float) -> tuple[float, str]:
        """(seconds from rank 1's halt to rank 0's return, what rank 0 returned)."""
        done = self.marks / "rank0.done"
        deadline = time.monotonic() + limit
        while not done.exists():
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"rank 0 did not return within {limit} s:\n{self.text()}")
            time.sleep(0.2)
        time.sleep(0.2)  # the file is written in one call; let it land
        halted = float((self.marks / "halted").read_text().split()[1])
        when, result = done.read_text().split(" ", 1)
        return float(when) - halted, result

    def finish(self) -> int:
        """Kill what is left of rank 1 and wait for the launcher; its exit status."""
        _release(self.marks, self.script)
        assert self.proc is not None
        return self.proc.wait(timeout=60)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def close(self) -> None:
        _release(self.marks, self.script)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        _release(self.marks, self.script)  # a rank started while the launcher was killed


@pytest.fixture
def launch(inputs: Path, tmp_path: Path) -> Iterator[Launch]:
    run = Launch(inputs, tmp_path)
    try:
        yield run
    finally:
        run.close()


def _error_line(text: str, rank: int) -> str:
    tag = f"drm-merge [rank {rank}/2]: error:"
    lines = [line for line in text.splitlines() if tag in line]
    assert lines, text
    return lines[0]


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("where", ["merge", "send"])
def test_a_stopped_rank_is_named_after_the_timeout(launch: Launch, where: str) -> None:
    """Rank 1 SIGSTOPped before its first tensor (rank 0 waits at the step's check) or before
    sending a result (rank 0 waits in the receive): rank 0 names it after --timeout, exits 2,
    and leaves no output."""
    out = launch.tmp_path / "out"
    launch.start(
        "stop",
        where,
        str(launch.root / "ties.yaml"),
        "-o",
        str(out),
        "--no-progress",
        "--timeout",
        str(TIMEOUT_S),
    )
    waited, status = launch.rank0_result(TIMEOUT_S + SLACK_S + 60)
    assert status == "2", launch.text()
    assert TIMEOUT_S * 0.9 <= waited <= TIMEOUT_S + SLACK_S, (waited, launch.text())
    launcher_status = launch.finish()
    text = launch.text()
    line = _error_line(text, 0)
    assert f"rank 1 did not answer within {TIMEOUT_S} s (stopped or too slow" in line, text
    assert "its process is stopped" in line and "pass --timeout to wait longer" in line, text
    assert ("merging tensors" in line) if where == "merge" else ("sending 'layers." in line), text
    assert "Timed out" not in line and "gloo" not in line, text
    assert launcher_status != 0
    assert not out.exists() and not list(launch.tmp_path.glob("out.tmp-*"))


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("where", ["merge", "send", "busy"])
def test_a_killed_rank_is_named(launch: Launch, where: str) -> None:
    """Rank 1 SIGKILLed before its first tensor (rank 0 waits at the check), before sending
    (rank 0 waits in the receive), or while rank 0 is still merging (the launcher's SIGTERM
    reaches rank 0 first): rank 0 names rank 1 as ended without waiting out the timeout,
    exits non-zero and leaves no output."""
    out = launch.tmp_path / "out"
    launch.start(
        "kill",
        where,
        str(launch.root / "ties.yaml"),
        "-o",
        str(out),
        "--no-progress",
        "--timeout",
        "120",
    )
    waited, status = launch.rank0_result(SLACK_S + 60)
    # our error (status 2), or the launcher's SIGTERM (128 + 15) while rank 0 was busy; at
    # the check or in the receive a race between the two
    assert status == "143" if where == "busy" else status in ("2", "143"), launch.text()
    assert waited < 60, (waited, launch.text())  # not the 120 s timeout
    assert launch.finish() != 0
    text = launch.text()
    line = _error_line(text, 0)
    assert "rank 1 stopped (its process ended / connection closed)" in line, text
    assert "Connection closed by peer" not in text and "Connection reset" not in text, text
    assert not out.exists() and not list(launch.tmp_path.glob("out.tmp-*"))


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_a_group_the_user_created_keeps_its_timeout_and_names_the_rank(launch: Launch) -> None:
    """In-loop merges join the user's group: its timeout (here 4 s) applies; the failed
    collective still names rank 1 instead of gloo's raw timeout."""
    launch.start("stop", "user", "4")
    waited, result = launch.rank0_result(4 + SLACK_S + 60)
    launch.finish()
    assert result.startswith("2 RankUnresponsiveError: rank 1 did not answer within 4 s"), result
    assert "the process group's timeout sets how long ranks wait" in result, result
    assert 4 * 0.9 <= waited <= 4 + SLACK_S, waited


# ------------------------------------------------------------------------------ in process


def test_timeout_flag_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("0", "-3", "soon", "inf", "nan"):
        with pytest.raises(SystemExit) as exc:
            main([str(tmp_path / "c.yaml"), "-o", str(tmp_path / "out"), "--timeout", bad])
        assert exc.value.code == 2
        assert f"--timeout: expected a positive number of seconds, got '{bad}'" in (
            capsys.readouterr().err
        )


def test_process_states_are_read_from_proc() -> None:
    """What the survivor reports: a running, a stopped and an ended process on this machine."""
    if comm_module._identity() is None:
        pytest.skip("no Linux /proc")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = comm_module._identity()
        assert mine is not None
        ident = mine.rpartition("|")[0] + f"|{child.pid}"
        assert comm_module._process_state(ident) == "running"
        os.kill(child.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while comm_module._process_state(ident) != "stopped" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert comm_module._process_state(ident) == "stopped"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        assert comm_module._process_state(ident) == "ended"
        # another machine or pid namespace: its pid means nothing here
        assert comm_module._process_state(f"other-boot|pid:[1]|{os.getpid()}") is None
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGCONT)
            child.kill()
            child.wait(timeout=10)
