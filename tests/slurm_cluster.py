"""A real one-machine Slurm cluster for the tests: munged, slurmctld and two slurmd ("n1", "n2") started
by hand in a temporary folder (no systemd), with fake GPU devices so GPU-shaped scripts run unchanged.
Stopped by the process ids it started. Also runnable by hand: `python tests/slurm_cluster.py` starts one
and prints the SLURM_CONF to export.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
NODES = ("n1", "n2")


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and cannot be installed here."""


def ensure_installed() -> None:
    if all(shutil.which(d) or Path("/usr/sbin", d).exists() for d in DAEMONS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and this is not a root Debian/Ubuntu machine: "
                               f"install {' '.join(PACKAGES)} to run the Slurm tests")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr[-500:]}")


def free_port_range(count: int) -> int:
    """The first of `count` consecutive free TCP ports."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count < 65000 and all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no run of free ports found")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.procs: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- configuration ----------------------------------------------------------------------------
    def _write_config(self) -> None:
        r = self.root
        r.chmod(0o755)  # munged (as the munge user) must reach its folder inside; keep `root` outside 0700 dirs
        for sub in ("state", "log", "dev", *(f"spool/{n}" for n in NODES)):
            (r / sub).mkdir(parents=True, exist_ok=True)
        ctld_port = free_port_range(1)
        node_port = free_port_range(len(NODES))
        gres = self._fake_gpus()
        node_gres = " Gres=gpu:2" if gres else ""
        self.conf.write_text(f"""\
ClusterName=ftltest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
AuthType=auth/munge
AuthInfo=socket={r / 'munge' / 'munge.socket.2'},cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool' / '%n'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd-%n.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1,bf_interval=1
SlurmdParameters=config_overrides
MailProg=/bin/true
ReturnToService=2
MinJobAge=3600
KillWait=10
{"GresTypes=gpu" if gres else ""}
NodeName=n[1-{len(NODES)}] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[{node_port}-{node_port + len(NODES) - 1}] CPUs=2 RealMemory=8000{node_gres} State=UNKNOWN
PartitionName=debug Nodes=n[1-{len(NODES)}] Default=YES MaxTime=INFINITE State=UP
""")
        if gres:
            (r / "gres.conf").write_text(f"NodeName=n[1-{len(NODES)}] Name=gpu File={r / 'dev'}/gpu[0-1]\n")

    def _fake_gpus(self) -> bool:
        """Character devices standing in for GPUs (jobs asking for GPUs then get CUDA_VISIBLE_DEVICES)."""
        for i in range(2):
            dev = self.root / "dev" / f"gpu{i}"
            if not dev.exists() and subprocess.run(["mknod", str(dev), "c", "1", "3"],
                                                   capture_output=True).returncode != 0:
                return False
        return True

    # -- daemons ----------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> "SlurmCluster":
        ensure_installed()
        self._write_config()
        self._start_munge()
        logs = self.root / "log"
        self._spawn(["slurmctld", "-D", "-i"], logs / "slurmctld.out")
        for node in NODES:
            self._spawn(["slurmd", "-D", "-N", node], logs / f"slurmd-{node}.out")
        self._wait_idle(timeout)
        return self

    def _start_munge(self) -> None:
        munge_dir = self.root / "munge"
        munge_dir.mkdir(exist_ok=True)
        munge_dir.chmod(0o755)  # clients (every job) must reach the socket
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        user = pwd.getpwnam("munge")
        for path in (munge_dir, key):
            os.chown(path, user.pw_uid, user.pw_gid)
        argv = ["munged", "-F", f"--socket={munge_dir / 'munge.socket.2'}", f"--key-file={key}",
                f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
                f"--seed-file={munge_dir / 'munged.seed'}"]
        if os.geteuid() == 0:  # munged refuses to run as root with a key it does not own
            argv = ["runuser", "-u", "munge", "--"] + argv
        self._spawn(argv, self.root / "log" / "munged.out")
        deadline = time.time() + 15
        while not (munge_dir / "munge.socket.2").exists():
            if time.time() > deadline or self.procs[-1].poll() is not None:
                raise RuntimeError(f"munged did not start: {self._tail(self.root / 'log' / 'munged.out')}")
            time.sleep(0.1)

    def _spawn(self, argv: list[str], log: Path) -> None:
        with log.open("w") as out:
            self.procs.append(subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True,
                                 text=True).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if len(states) == len(NODES) and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"Slurm nodes not idle after {timeout:.0f}s: {out!r}\n"
                           f"{self._tail(self.root / 'log' / 'slurmctld.log')}")

    @staticmethod
    def _tail(path: Path, lines: int = 20) -> str:
        return "".join(path.read_text(errors="replace").splitlines(True)[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:  # its own session: the signal reaches runuser's child too
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()


if __name__ == "__main__":
    import tempfile

    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="ftl-slurm-"))).start()
    print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.stop()
