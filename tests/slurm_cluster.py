"""A real single-node SLURM cluster for tests: munged, slurmctld and slurmd on localhost.

It installs nothing (``.ci/run`` installs slurm-wlm and munge); it writes a minimal slurm.conf into
a temporary directory, starts the daemons, waits until the node is idle, and stops everything in
``stop()``, which the fixture calls even when a test fails. Every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

CONF = """ClusterName=hpcddtest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmi2
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
JobRequeue=1
FirstJobId={first_job}
KillWait=30
MinJobAge=3600
NodeName=localhost NodeAddr=127.0.0.1 CPUs=8 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def missing() -> str | None:
    """Why a cluster cannot start here (None if it can)."""
    for exe in ("slurmctld", "slurmd", "munged", "srun", "sbatch", "scontrol", "sinfo"):
        if not (shutil.which(exe) or os.path.exists(f"/usr/sbin/{exe}")):
            return f"{exe} not installed (apt-get install slurm-wlm munge; .ci/run does)"
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as root"
    return None


class Cluster:
    def __init__(self, directory: str, ctld_port: int = 16817, d_port: int = 16818):
        self.dir = directory
        self.conf = os.path.join(directory, "slurm.conf")
        self.procs: list[subprocess.Popen] = []
        self.munged_started = False
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(directory, sub), exist_ok=True)
        with open(self.conf, "w") as f:
            # job ids never repeat across test clusters: MPICH names shared memory after the job step
            first_job = 1000 + int(time.time()) % 1_000_000 * 10
            f.write(CONF.format(d=directory, ctld_port=ctld_port, d_port=d_port, first_job=first_job))
        self.env = dict(os.environ, SLURM_CONF=self.conf)

    def run(self, *cmd, timeout=60, check=True, **kw):
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=kw.pop("env", self.env), **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return proc

    def _munged(self) -> None:
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            return
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        if not os.path.exists("/etc/munge/munge.key"):
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/mungekey", "--create"], check=True, timeout=30)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, timeout=30)
        self.munged_started = True

    def start(self, timeout: float = 60) -> "Cluster":
        self._munged()
        for cmd in (["/usr/sbin/slurmctld", "-D", "-i", "-f", self.conf], ["/usr/sbin/slurmd", "-D", "-N", "localhost", "-f", self.conf]):
            log = open(os.path.join(self.dir, os.path.basename(cmd[0]) + ".out"), "w")
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                               start_new_session=True))
            time.sleep(0.5)
        t0 = time.time()
        while time.time() - t0 < timeout:
            proc = self.run("sinfo", "-h", "-o", "%t", check=False, timeout=20)
            if proc.returncode == 0 and proc.stdout.strip() in ("idle", "mix", "alloc"):
                return self
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited: {open(os.path.join(self.dir, os.path.basename(p.args[0]) + '.out')).read()[-2000:]}")
            time.sleep(0.5)
        raise RuntimeError(f"the test node did not become idle in {timeout} s: {self.run('sinfo', check=False).stdout}")

    def wait_job(self, job: str, timeout: float = 600) -> str:
        """Poll until the job leaves the queue; returns its final state (squeue polling is faster than --wait)."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            q = self.run("squeue", "-h", "-j", job, "-o", "%T", check=False, timeout=20)
            if q.returncode != 0 or not q.stdout.strip():
                break
            time.sleep(1)
        else:
            self.run("scancel", job, check=False)
            raise TimeoutError(f"job {job} still queued or running after {timeout} s")
        info = self.run("scontrol", "show", "job", job, check=False, timeout=20).stdout
        for field in info.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def stop(self) -> None:
        self.run("scancel", "--user=root", check=False, timeout=20)
        self.run("scontrol", "shutdown", check=False, timeout=20)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=15)
        subprocess.run(["pkill", "-9", "-f", "slurmstepd:"], check=False)  # steps orphaned by the shutdown
        if self.munged_started:
            try:
                with open("/run/munge/munged.pid") as f:
                    os.kill(int(f.read().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                subprocess.run(["pkill", "-x", "munged"], check=False)
