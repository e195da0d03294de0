"""How many CPU threads torch runs with (``--threads``).

torch's default is one OpenMP thread per logical CPU of the machine. Batch-1 decoding is a long
chain of small parallel regions, each ending at a barrier, so one thread that has to share its
core with another busy process stalls every step: with other work running, decode speed drops
by an order of magnitude (36.5 → 2.6 tokens/s measured). Hyper-threads add nothing to a
memory-bound matmul either. The default here is therefore the number of physical cores this
process may use, never more than the CPUs that are free right now:

* usable CPUs: ``os.sched_getaffinity`` (taskset, cpusets), capped by a cgroup CPU quota
  (``docker --cpus``);
* physical cores: distinct (package, core) pairs of the usable CPUs (Linux sysfs);
* free: usable CPUs minus the busy ones, measured over a short sample of ``/proc/stat`` for
  those CPUs (falling back to the 1-minute load average).

``OMP_NUM_THREADS``, when set, is taken as the user's choice; ``--threads N`` overrides all.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from llmchat.errors import UsageError

SAMPLE_S = 0.05  # /proc/stat sampling window; long enough for 10 ms jiffies summed over CPUs


def usable_cpus() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup CPU limit in CPUs (cgroup v2 ``cpu.max`` or v1 cfs quota), or None."""
    try:
        quota, _, period = (root / "cpu.max").read_text().partition(" ")
        if quota.strip() != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def physical_cores(cpus: list[int], sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Distinct physical cores among ``cpus`` (hyper-thread siblings count once)."""
    cores = set()
    for cpu in cpus:
        topo = sysfs / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(),
                       (topo / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)  # no topology information: assume no SMT
    return len(cores) or len(cpus)


def _cpu_times(cpus: set[int], stat: Path) -> dict[int, tuple[int, int]]:
    """cpu → (busy jiffies, total jiffies) from /proc/stat."""
    out = {}
    for line in stat.read_text().splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        cpu = int(name[3:])
        if cpu in cpus:
            vals = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
            out[cpu] = (sum(vals) - idle, sum(vals))
    return out


def busy_cpus(cpus: list[int], *, sample_s: float = SAMPLE_S,
              stat: Path = Path("/proc/stat")) -> float:
    """How many of ``cpus`` other processes keep busy (this process sleeps while it measures)."""
    wanted = set(cpus)
    try:
        before = _cpu_times(wanted, stat)
        time.sleep(sample_s)
        after = _cpu_times(wanted, stat)
        busy = 0.0
        for cpu, (b1, t1) in after.items():
            b0, t0 = before.get(cpu, (b1, t1))
            if t1 > t0:
                busy += (b1 - b0) / (t1 - t0)
        if after:
            return busy
    except (OSError, ValueError, IndexError):
        pass
    try:  # the machine's load, scaled to the share of it that we may use
        return os.getloadavg()[0] * len(cpus) / max(os.cpu_count() or 1, len(cpus))
    except OSError:
        return 0.0


def default_threads() -> int:
    """Physical cores we may use, never more than are free now (at least 1)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = usable_cpus()
    limit = len(cpus)
    quota = cgroup_cpu_quota()
    if quota is not None:
        limit = min(limit, max(1, math.floor(quota)))
    free = round(len(cpus) - busy_cpus(cpus))
    return max(1, min(physical_cores(cpus), limit, free))


def resolve_threads(requested: int | None = None) -> int:
    """``--threads N`` as given (validated), else ``default_threads()``."""
    if requested is None:
        return default_threads()
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise UsageError(f"invalid --threads {requested!r}; use a positive number")
    return requested


def apply_threads(requested: int | None = None) -> int:
    """Set torch's intra-op thread count (before the model runs) and return it."""
    import torch

    n = resolve_threads(requested)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
