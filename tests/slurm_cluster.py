"""A real SLURM cluster for tests: munged, slurmctld and slurmd on localhost, or slurmd on emulated nodes.

``Cluster(dir)`` is one node (localhost). ``Cluster(dir, nodes=2)`` emulates two hosts on this
machine: a bridge with 10.251.7.1/24 in the root network namespace, and per node a network and UTS
namespace (its own hostname ``nodeK`` and address 10.251.7.1K on a veth pair), running its own
slurmd with its own spool directory; the file system is shared, as a parallel file system would be.
It installs nothing (``.ci/run`` installs slurm-wlm and munge); it writes a minimal slurm.conf into
a temporary directory, starts the daemons, waits until the node is idle, and stops everything in
``stop()``, which the fixture calls even when a test fails. Every wait is bounded.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import time

CONF = """ClusterName=hpcddtest
SlurmctldHost={ctld_host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd%n.log
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
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
BRIDGE_NET = "10.251.7"


def missing() -> str | None:
    """Why a cluster cannot start here (None if it can)."""
    for exe in ("slurmctld", "slurmd", "munged", "srun", "sbatch", "scontrol", "sinfo"):
        if not (shutil.which(exe) or os.path.exists(f"/usr/sbin/{exe}")):
            return f"{exe} not installed (apt-get install slurm-wlm munge; .ci/run does)"
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as root"
    return None


def namespaces_missing() -> str | None:
    """Why emulated nodes cannot be made here (None if they can)."""
    why = missing()
    if why:
        return why
    for exe in ("ip", "nsenter", "unshare"):
        if not shutil.which(exe):
            return f"{exe} not installed (iproute2, util-linux)"
    probe = f"hpcdd-probe-{os.getpid()}"
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"network namespaces not permitted here: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Cluster:
    def __init__(self, directory: str, ctld_port: int = 16817, d_port: int = 16818, nodes: int = 0,
                 node_local: str | None = None):
        """``node_local``: a folder that nodes other than node1 see as their own empty tmpfs (their own
        mount namespace): a path that is not on a shared file system."""
        self.dir = directory
        self.conf = os.path.join(directory, "slurm.conf")
        self.procs: list[subprocess.Popen] = []
        self.munged_started = False
        self.nodes = [f"node{k}" for k in range(1, nodes + 1)]
        self.node_local = node_local
        self.bridge = "br-hpcdd"
        self.netns = [f"hpcdd-{n}" for n in self.nodes]
        for sub in ["state"] + [f"spool{n}" for n in self.nodes or ["localhost"]]:
            os.makedirs(os.path.join(directory, sub), exist_ok=True)
        if node_local:
            # PMIx puts per-step folders under /tmp by default; on emulated nodes sharing /tmp their names
            # collide, so each node gets the node-local folder instead
            with open(os.path.join(directory, "mpi.conf"), "w") as f:
                f.write(f"PMIxCliTmpDirBase={node_local}\n")
        if self.nodes:
            ctld_host = f"{platform.node()}({BRIDGE_NET}.1)"
            lines = [f"NodeName={n} NodeAddr={BRIDGE_NET}.{10 + k} CPUs=8 State=UNKNOWN"
                     for k, n in enumerate(self.nodes, 1)]
        else:
            ctld_host = "localhost"
            lines = ["NodeName=localhost NodeAddr=127.0.0.1 CPUs=8 State=UNKNOWN"]
        with open(self.conf, "w") as f:
            # job ids never repeat across test clusters: MPICH names shared memory after the job step
            first_job = 1000 + int(time.time()) % 1_000_000 * 10
            f.write(CONF.format(d=directory, ctld_port=ctld_port, d_port=d_port, first_job=first_job,
                                ctld_host=ctld_host, nodes="\n".join(lines)))
        self.env = dict(os.environ, SLURM_CONF=self.conf)

    def _ip(self, *args, check=True):
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if check and proc.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def _network(self) -> None:
        """The bridge and one namespace + veth pair per node (anything left by a crashed test first removed)."""
        self._teardown_network()
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._ip("addr", "add", f"{BRIDGE_NET}.1/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for k, (node, ns) in enumerate(zip(self.nodes, self.netns), 1):
            self._ip("netns", "add", ns)
            self._ip("link", "add", f"veth-hpcdd{k}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._ip("link", "set", f"veth-hpcdd{k}", "master", self.bridge, "up")
            self._ip("-n", ns, "addr", "add", f"{BRIDGE_NET}.{10 + k}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
            self._ip("-n", ns, "link", "set", "lo", "up")

    def _teardown_network(self) -> None:
        for k, ns in enumerate(self.netns, 1):
            self._ip("netns", "del", ns, check=False)
            self._ip("link", "del", f"veth-hpcdd{k}", check=False)
        self._ip("link", "del", self.bridge, check=False)

    def node_pids(self, node: str) -> list[int]:
        """Processes running on an emulated node (in its network namespace), slurmd excluded."""
        proc = subprocess.run(["ip", "netns", "pids", self.netns[self.nodes.index(node)]], capture_output=True,
                              text=True, timeout=30)
        pids = [int(p) for p in proc.stdout.split()]
        daemons = {p.pid for p in self.procs}
        return [p for p in pids if p not in daemons]

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
        cmds = [("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i", "-f", self.conf])]
        if self.nodes:
            self._network()
            for node, ns in zip(self.nodes, self.netns):
                # nsenter, not `ip netns exec` (which remounts /sys, and slurmd then finds no cgroup fs)
                private = self.node_local and node != self.nodes[0]
                mount = f"mount -t tmpfs tmpfs {self.node_local} && " if private else ""
                cmds.append((f"slurmd-{node}", ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts"]
                             + (["--mount", "--propagation", "private"] if private else []) + [
                                 "sh", "-c", f"{mount}hostname {node} && exec /usr/sbin/slurmd -D -N {node} -f {self.conf}"]))
        else:
            cmds.append(("slurmd", ["/usr/sbin/slurmd", "-D", "-N", "localhost", "-f", self.conf]))
        for name, cmd in cmds:
            log = open(os.path.join(self.dir, name + ".out"), "w")
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
            p.name = name
            self.procs.append(p)
            time.sleep(0.5)
        want = len(self.nodes) or 1
        t0 = time.time()
        while time.time() - t0 < timeout:
            proc = self.run("sinfo", "-h", "-N", "-o", "%t", check=False, timeout=20)
            states = proc.stdout.split()
            if proc.returncode == 0 and len(states) == want and all(s in ("idle", "mix", "alloc") for s in states):
                return self
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.name} exited: {open(os.path.join(self.dir, p.name + '.out')).read()[-2000:]}")
            time.sleep(0.5)
        raise RuntimeError(f"the test nodes did not become idle in {timeout} s: {self.run('sinfo', check=False).stdout}")

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

    def release_requeued(self, job: str, timeout: float = 180) -> None:
        """Start a requeued job now instead of after SLURM's hold (about two minutes), once that is safe:
        no step of it left, every node idle again (its epilog done; on emulated nodes no process left),
        and a few seconds past the requeue, because slurmd refuses a job credential issued in the
        second its job's old one was revoked ("Killing non-startable batch job: Job credential
        revoked", the job then ends FAILED)."""
        t0, why = time.time(), ""
        while time.time() - t0 < timeout:
            steps = self.run("squeue", "-h", "-s", "-j", job, check=False).stdout.strip()
            states = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split("\n")
            busy = [s for s in states if s.strip() and not s.split()[-1].startswith("idle")]
            leftovers = [n for n in self.nodes if self.node_pids(n)]
            why = f"steps {steps!r}, nodes not idle {busy}, processes left on {leftovers}"
            if not steps and not busy and not leftovers:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"requeued job {job} never became startable in {timeout:.0f} s: {why}")
        time.sleep(3.0)
        self.run("scontrol", "update", f"jobid={job}", "StartTime=now", check=False)

    def ctld_lines(self, job: str, last: int = 40) -> str:
        """slurmctld's log lines about ``job`` (for a failed test's message: why SLURM did what it did)."""
        try:
            lines = open(os.path.join(self.dir, "slurmctld.log")).read().splitlines()
        except OSError:
            return ""
        return "\n".join([ln for ln in lines if f"JobId={job}" in ln or f" {job} " in ln][-last:])

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
        for ns in self.netns:  # anything still running on an emulated node
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        if self.nodes:
            self._teardown_network()
        if self.munged_started:
            try:
                with open("/run/munge/munged.pid") as f:
                    os.kill(int(f.read().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                subprocess.run(["pkill", "-x", "munged"], check=False)
            t0 = time.time()  # gone before the next cluster looks for it (it would find one exiting)
            while subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0 and time.time() - t0 < 15:
                time.sleep(0.1)
