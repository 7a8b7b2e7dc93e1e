"""A real SLURM cluster for tests: start it in a temp dir, submit jobs, wait, stop it.

    with slurm_cluster() as c:                      # runs start_slurm.sh (installs packages if missing)
        job = c.sbatch("#!/bin/bash\\nsrun -n 2 hostname\\n", args=["-n", "2"])
        assert c.wait(job, timeout=60) == "COMPLETED", c.describe(job)
        print(c.output(job))
    with slurm_cluster(nodes=3) as c:               # 3 nodes rdsnode1..3 on this machine (node.sh)
        c.crash("rdsnode2")                         # SIGKILL everything on node 2; c.restore("rdsnode2")

Tests use the session fixtures `slurm` (the one-node cluster) and `slurm_multinode` (MULTINODE_NODES
namespace nodes), one of each per pytest run; tests that need one carry `@pytest.mark.slurm`. They
skip, saying why, without root, without apt-get when packages are missing, or when
ROBERTA_DS_SLURM=0. A cluster that fails to start is an error, not a skip.

The daemons listen on free ports and read $base/slurm.conf (nothing is written to /etc/slurm), so
the cluster does not disturb another one on the machine. Clients find it through SLURM_CONF, which
`env()` sets and sbatch passes on to the job (it exports the submitting environment).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
START = HERE / "start_slurm.sh"
STOP = HERE / "stop_slurm.sh"
REPO = HERE.parent.parent

NODE_SH = HERE / "node.sh"

NEEDED_COMMANDS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "mpirun")
MULTINODE_NODES = 3
"""Nodes of the multi-node test cluster: jobs take 2, so a job requeued after a node failure finds 2
healthy ones."""
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
    "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT",
})

# Launcher variables from the environment pytest runs in (e.g. CI inside a SLURM job, or a shell
# that exported RANK) must not leak into the test cluster's jobs or into local mpirun runs.
_LAUNCHER_PREFIXES = ("SLURM_", "SLURMD_", "OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_")
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                  "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "GROUP_RANK", "ROLE_RANK")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without any launcher's variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_LAUNCHER_PREFIXES) and k not in _LAUNCHER_VARS}
    env.update(extra or {})
    return env


def skip_reason(multinode: bool = False) -> str | None:
    """Why the SLURM tests cannot run here, or None if they can (CI: root + apt-get)."""
    if os.environ.get("ROBERTA_DS_SLURM", "1") == "0":
        return "ROBERTA_DS_SLURM=0"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (it installs and starts slurmctld/slurmd/munge as root)"
    if multinode and sys.platform != "linux":
        return "needs Linux network namespaces"
    needed = NEEDED_COMMANDS + (("ip", "nsenter", "unshare") if multinode else ())
    if all(shutil.which(c) or Path("/usr/sbin", c).exists() for c in needed):
        return None
    if shutil.which("apt-get") is None:
        return "SLURM/OpenMPI are not installed and there is no apt-get to install them"
    return None


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class JobResult:
    job_id: int
    state: str
    exit_code: str
    """SLURM's "code:signal", e.g. "0:0" or "1:0"."""
    output: str


class SlurmCluster:
    """Handle on a running test cluster: submit, wait, inspect. Made by `slurm_cluster()`."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.conf = base / "slurm.conf"
        self.jobs_dir = base / "jobs"
        self.slurmctld_log = base / "log" / "slurmctld.log"
        self._seq = 0
        self._lock = threading.Lock()

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for SLURM clients (and, through sbatch, for jobs): clean + SLURM_CONF + extra."""
        return clean_env({"SLURM_CONF": str(self.conf), **(extra or {})})

    def run(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 60,
            check: bool = True, cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run any command (srun, sinfo, mpirun, ...) against this cluster; text output captured."""
        proc = subprocess.run(list(argv), env=self.env(env), capture_output=True, text=True, timeout=timeout,
                              cwd=cwd, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
                               f"stderr:\n{proc.stderr}")
        return proc

    def scontrol(self, *args: str) -> str:
        return self.run(["scontrol", *args]).stdout

    def squeue(self, *args: str) -> str:
        return self.run(["squeue", *args]).stdout

    def sbatch(self, script: str | Path, *, env: Mapping[str, str] | None = None,
               args: Sequence[str] = (), name: str = "job", cwd: str | Path | None = None) -> int:
        """Submit a batch job; returns its id. `script` is a file (Path) or the script text (str).

        Submitted from `cwd` (default: the cluster's jobs/ dir) as a user would: it becomes the job's
        working directory and SLURM_SUBMIT_DIR. Output (stdout + stderr) goes to
        `output_path(job_id)` unless `args` sets -o/--output (command-line flags override the
        script's #SBATCH lines). `env` is added to the job's environment (sbatch exports the
        submitting environment, launcher variables of the test process removed).
        """
        if isinstance(script, str):
            with self._lock:
                self._seq += 1
                path = self.jobs_dir / f"{name}-{self._seq}.sbatch"
            path.write_text(script if script.startswith("#!") else "#!/bin/bash\n" + script)
            path.chmod(0o755)
        else:
            path = Path(script).resolve()
        argv = ["sbatch", "--parsable", f"--job-name={name}"]
        if not any(a.startswith(("-o", "--output")) for a in args):
            argv.append(f"--output={self.jobs_dir}/%j.out")
        proc = self.run([*argv, *args, str(path)], env=env, cwd=cwd or self.jobs_dir)
        return int(proc.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, ExitCode, StdOut, ...); {} once SLURM forgot it."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        info: dict[str, str] = {}
        for item in proc.stdout.split():
            key, sep, value = item.partition("=")
            if sep and key not in info:
                info[key] = value
        return info

    def wait(self, job_id: int, timeout: float = 120, *,
             until: frozenset[str] | set[str] = FINAL_STATES) -> str:
        """Poll until the job's state is in `until` (default: a final state) and return it.

        Polls `scontrol show job` every 0.2 s (faster than `sbatch --wait`). Waiting for RUNNING
        returns early with the final state if the job ended first. On timeout the job is cancelled
        and TimeoutError carries `describe()`.
        """
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            state = self.job_info(job_id).get("JobState", "?")
            if state in until or state in FINAL_STATES:
                return state
            time.sleep(0.2)
        self.run(["scancel", str(job_id)], check=False)
        raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s\n{self.describe(job_id)}")

    def scancel(self, job_id: int, *args: str) -> None:
        """`scancel [args] JOB`, e.g. scancel(job, "--signal=USR1") delivers at once to every task
        (add "--batch" for the batch shell only)."""
        self.run(["scancel", *args, str(job_id)])

    def requeue(self, job_id: int) -> None:
        """Requeue an ended job and start it again once it can (plain `scontrol requeue` waits ~120 s).

        slurmd revokes a job's credential when the job is terminated, and a restart before the
        revocation expires (`cred_expire`: 10 s here, see start_slurm.sh) is killed at launch ("Job
        credential revoked", the job ends FAILED). So the restart is set for just after that.
        """
        self.run(["scontrol", "requeue", str(job_id)])
        wait = int(os.environ.get("SLURM_CRED_EXPIRE", "10")) + 1
        self.run(["scontrol", "update", f"jobid={job_id}", f"StartTime=now+{wait}"], check=False)

    def wait_requeued(self, job_id: int, restarts: int = 1, timeout: float = 120) -> None:
        """Wait until the job is pending again after its `restarts`-th requeue (e.g. one the job's
        own script asked for); TimeoutError with `describe()` if it ends or keeps running instead."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") == "PENDING" and int(info.get("Restarts", "0")) >= restarts:
                return
            if info.get("JobState") in FINAL_STATES:
                break
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} was not requeued (state {info.get('JobState')}, restarts "
                           f"{info.get('Restarts')})\n{self.describe(job_id)}")

    def output_path(self, job_id: int) -> Path:
        return self.jobs_dir / f"{job_id}.out"

    def output(self, job_id: int) -> str:
        path = self.output_path(job_id)
        return path.read_text(errors="replace") if path.exists() else ""

    def run_job(self, script: str | Path, *, env: Mapping[str, str] | None = None,
                args: Sequence[str] = (), name: str = "job", timeout: float = 120,
                cwd: str | Path | None = None) -> JobResult:
        """sbatch + wait + collect: the usual test step."""
        job_id = self.sbatch(script, env=env, args=args, name=name, cwd=cwd)
        state = self.wait(job_id, timeout)
        return JobResult(job_id, state, self.job_info(job_id).get("ExitCode", "?"), self.output(job_id))

    def describe(self, job_id: int) -> str:
        """Everything useful when a job test fails: job record, its output, the daemons' log tails."""
        parts = [f"--- scontrol show job {job_id}", self.run(["scontrol", "show", "job", str(job_id)],
                                                               check=False).stdout,
                 f"--- output {self.output_path(job_id)}", self.output(job_id)[-4000:]]
        parts += ["--- sinfo", self.run(["sinfo", "-N", "-o", "%N %T %E"], check=False).stdout]
        for log in (self.slurmctld_log, *sorted(self.slurmctld_log.parent.glob("slurmd*.log"))):
            lines = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
            parts += [f"--- tail {log}", "\n".join(lines)]
        return "\n".join(parts)


class MultiNodeCluster(SlurmCluster):
    """A cluster of namespace nodes rdsnode1..N on this machine (start_slurm.sh with SLURM_NODES=N,
    tests/cluster/node.sh), with the faults a real cluster has: a node crashing, its link cut."""

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        env = dict(line.split("=", 1) for line in (base / "cluster.env").read_text().splitlines()
                   if "=" in line and not line.startswith("#"))
        self.nodes = [f"rdsnode{i}" for i in range(1, int(env["RDS_NODES"]) + 1)]
        self.net = env["RDS_NET"]
        """The first three octets of the cluster's /28; node i is .(i+1), the bridge .1."""
        self.netns_prefix = f"rds{env['RDS_ID']}n"

    def address(self, node: str) -> str:
        return f"{self.net}.{self.nodes.index(node) + 2}"

    def node_sh(self, *args: str, timeout: float = 60,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["bash", str(NODE_SH), args[0], str(self.base), *args[1:]], timeout=timeout,
                        check=check)

    def run_on(self, node: str, argv: Sequence[str], timeout: float = 60,
               check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command on `node`: its network, hostname and /etc/hosts (not as a job)."""
        return self.node_sh("run", node, *argv, timeout=timeout, check=check)

    def crash(self, node: str) -> None:
        """SIGKILL every process in the node's network namespace: slurmd, job steps, ranks."""
        self.node_sh("crash", node)

    def cut(self, node: str) -> None:
        """A network partition: the node's link goes down; its processes keep running."""
        self.node_sh("cut", node)

    def heal(self, node: str) -> None:
        self.node_sh("heal", node)

    def netns_pids(self, node: str) -> list[int]:
        """Processes in the node's network namespace (slurmd included)."""
        ns = f"{self.netns_prefix}{self.nodes.index(node) + 1}"
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout
        return [int(p) for p in out.split()]

    def node_state(self, node: str) -> str:
        """SLURM's state of the node, e.g. "idle", "mixed", "down*" (* = not responding)."""
        return self.run(["sinfo", "-h", "-N", "-n", node, "-o", "%T"], check=False).stdout.strip()

    def wait_node_state(self, node: str, states: Sequence[str], timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            state = self.node_state(node)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"{node} still {state!r} after {timeout:.0f} s, not one of {list(states)}")

    def slurmd_alive(self, node: str) -> bool:
        pidfile = self.base / "state" / f"slurmd-{node}.pid"
        try:
            os.kill(int(pidfile.read_text()), 0)
        except (OSError, ValueError):
            return False
        return True

    def restore(self, node: str, timeout: float = 120) -> None:
        """Bring a crashed or cut node back to idle: link up, slurmd restarted if it is gone.

        A crashed node's slurmd is restarted only once SLURM has marked the node DOWN: restarted
        before, it registers as if nothing happened and srun waits forever for the lost step.
        """
        self.heal(node)
        if not self.slurmd_alive(node):
            self.wait_node_state(node, ("down*", "down"), timeout)
            self.node_sh("start", node)
        self.wait_node_state(node, ("idle",), timeout)


@contextlib.contextmanager
def slurm_cluster(base: str | Path | None = None, *, nodes: int = 1, auth: str = "none",
                  with_mpi: bool = True, install: bool = True, keep: bool = False) -> Iterator[SlurmCluster]:
    """Start a cluster under `base` (default: a new temp dir), yield it, stop it (also if the start
    failed half-way: stop_slurm.sh undoes what there is).

    nodes: 1 (this machine) or N >= 2 namespace nodes (a MultiNodeCluster). auth: "none" (no munge
    daemon) or "munge". install: apt-get the missing packages. keep: leave the base directory (logs,
    job outputs) after stopping, for debugging; it is also kept when ROBERTA_DS_SLURM_KEEP=1.
    """
    made = base is None
    root = Path(base) if base is not None else Path(tempfile.mkdtemp(prefix="roberta-ds-slurm-"))
    ctld_port, slurmd_port = _free_ports(2)
    env = clean_env({
        "SLURM_BASE": str(root), "SLURM_AUTH": auth, "SLURM_INSTALL": "1" if install else "0",
        "SLURM_WITH_MPI": "1" if with_mpi else "0", "SLURM_NODES": str(nodes),
        "SLURMCTLD_PORT": str(ctld_port), "SLURMD_PORT": str(slurmd_port),
    })
    proc = subprocess.run(["bash", str(START)], env=env, capture_output=True, text=True, timeout=900, check=False)
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"start_slurm.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        yield SlurmCluster(root) if nodes == 1 else MultiNodeCluster(root)
    finally:
        stop = subprocess.run(["bash", str(STOP), str(root)], capture_output=True, text=True, timeout=120,
                              check=False)
        if stop.returncode != 0:  # keep the base: its cluster.env lets a second stop_slurm.sh finish the job
            print(f"stop_slurm.sh {root}: exit {stop.returncode}\n{stop.stdout}{stop.stderr}")
        if made and not keep and stop.returncode == 0 and os.environ.get("ROBERTA_DS_SLURM_KEEP") != "1":
            shutil.rmtree(root, ignore_errors=True)


# ---- pytest: one cluster of each kind per session ------------------------------------------------
# Imported into several modules (a test file, conftest.py), a session fixture gets one FixtureDef
# per module; the reference count makes them share a single cluster, stopped by the last user.

_shared: dict[int, dict[str, object]] = {}
_shared_lock = threading.Lock()


def _acquire(nodes: int = 1) -> SlurmCluster:
    with _shared_lock:
        entry = _shared.setdefault(nodes, {"users": 0, "cm": None, "cluster": None})
        if entry["cluster"] is None:
            cm = slurm_cluster(nodes=nodes)
            entry["cluster"] = cm.__enter__()
            entry["cm"] = cm
        entry["users"] = int(entry["users"]) + 1  # type: ignore[call-overload]
        return entry["cluster"]  # type: ignore[return-value]


def _release(nodes: int = 1) -> None:
    with _shared_lock:
        entry = _shared[nodes]
        entry["users"] = int(entry["users"]) - 1  # type: ignore[call-overload]
        if entry["users"] == 0 and entry["cm"] is not None:
            cm, entry["cm"], entry["cluster"] = entry["cm"], None, None
            cm.__exit__(None, None, None)  # type: ignore[attr-defined]


try:
    import pytest
except ImportError:  # the module also works as a plain library
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    @pytest.fixture(scope="session")
    def slurm() -> Iterator[SlurmCluster]:
        """The session's SLURM test cluster (skips with the reason when it cannot run here)."""
        reason = skip_reason()
        if reason:
            pytest.skip(f"SLURM tests skipped: {reason}")
        cluster = _acquire()
        try:
            yield cluster
        finally:
            _release()

    @pytest.fixture(scope="session")
    def slurm_multinode() -> Iterator[MultiNodeCluster]:
        """The session's multi-node test cluster, MULTINODE_NODES nodes (skips like `slurm`). Its
        finalizer stops it, removing its namespaces, links and daemons, whatever the tests did."""
        reason = skip_reason(multinode=True)
        if reason:
            pytest.skip(f"multi-node SLURM tests skipped: {reason}")
        cluster = _acquire(MULTINODE_NODES)
        try:
            yield cluster  # type: ignore[misc]
        finally:
            _release(MULTINODE_NODES)
