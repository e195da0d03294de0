"""--threads: the default is the free physical cores, applied before the model runs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmchat import threads
from llmchat.cli import app
from llmchat.errors import UsageError
from tests.checkpoints import chatglm2_checkpoint

runner = CliRunner()


@pytest.fixture(autouse=True)
def _keep_torch_threads(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def fake_topology(root: Path, cores: list[tuple[int, int]]) -> Path:
    """sysfs cpuN/topology for CPUs 0..len-1 with the given (package, core) each."""
    for cpu, (pkg, core) in enumerate(cores):
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{pkg}\n")
        (topo / "core_id").write_text(f"{core}\n")
    return root


def test_physical_cores_count_hyperthread_siblings_once(tmp_path: Path) -> None:
    smt = fake_topology(tmp_path / "a", [(0, 0), (0, 1), (0, 0), (0, 1), (1, 0), (1, 0)])
    assert threads.physical_cores([0, 1, 2, 3, 4, 5], smt) == 3
    assert threads.physical_cores([0, 2], smt) == 1  # siblings of one core
    assert threads.physical_cores([0, 1], tmp_path / "none") == 2  # no topology: no SMT


def test_cgroup_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_quota(tmp_path) is None
    assert threads.cgroup_cpu_quota(tmp_path / "nothing") is None


@pytest.mark.parametrize("cpus,cores,busy,quota,want", [
    (16, 8, 0.0, None, 8),     # physical cores, not logical CPUs
    (16, 8, 12.3, None, 4),    # never more than are free
    (16, 8, 15.9, None, 1),    # at least one
    (16, 8, 0.0, 2.5, 2),      # docker --cpus 2.5
    (2, 2, 1.0, None, 1),      # one busy loop on a 2-core machine
    (2, 2, 0.3, None, 2),
])
def test_default_threads(monkeypatch: pytest.MonkeyPatch, cpus: int, cores: int, busy: float,
                         quota: float | None, want: int) -> None:
    monkeypatch.setattr(threads, "usable_cpus", lambda: list(range(cpus)))
    monkeypatch.setattr(threads, "physical_cores", lambda c: cores)
    monkeypatch.setattr(threads, "busy_cpus", lambda c: busy)
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: quota)
    assert threads.default_threads() == want
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting wins
    assert threads.default_threads() == 3


def test_busy_cpus_sees_a_busy_loop() -> None:
    cpu = threads.usable_cpus()[0]
    code = f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.3)
        assert threads.busy_cpus([cpu], sample_s=0.3) > 0.6
    finally:
        proc.kill()
        proc.wait()


def test_resolve_threads() -> None:
    assert threads.resolve_threads(3) == 3
    for bad in (0, -1, True, 1.5):
        with pytest.raises(UsageError, match="--threads"):
            threads.resolve_threads(bad)  # type: ignore[arg-type]
    assert threads.apply_threads(1) == 1 and torch.get_num_threads() == 1


def test_load_sets_and_reports_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmchat.loader import load

    ckpt = chatglm2_checkpoint(tmp_path / "m")
    m = load(model_path=ckpt, device="cpu", threads=1)
    assert m.info.extra["threads"] == 1 and torch.get_num_threads() == 1
    monkeypatch.setattr(threads, "default_threads", lambda: 2)
    m = load(model_path=ckpt, device="cpu")
    assert m.info.extra["threads"] == 2 and torch.get_num_threads() == 2

    res = runner.invoke(app, ["ask", "-p", str(ckpt), "--device", "cpu", "-n", "2", "-t", "0",
                              "--threads", "1", "-v", "hi"])
    assert res.exit_code == 0, res.output
    assert "1 threads" in res.stderr and torch.get_num_threads() == 1
    bad = runner.invoke(app, ["ask", "-p", str(ckpt), "--threads", "0", "hi"])
    assert bad.exit_code == 2
