"""A real local Kubernetes control plane for development and tests.

`up` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and the KWOK controller on
loopback, all compiled from the Go module proxy by `build-control-plane.sh`, and creates fake Nodes
that KWOK keeps Ready. Pods bound to those nodes become Running and Ready without containers.
Everything a cluster owns lives in one directory: certificates, data, logs, the admin kubeconfig and
`cluster.json`, which records the processes so that `down` can stop exactly them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BUILD_SCRIPT = Path(__file__).with_name("build-control-plane.sh")
STATE_FILE = "cluster.json"

#: Seconds a component gets to answer its health check. The API server is the slowest: its RBAC
#: bootstrap hook takes a few seconds on 2 cores, so 60 s leaves room for a loaded CI machine.
START_TIMEOUT_SECONDS = 60.0

#: How many times `up` picks fresh ports when a component cannot bind the ones it was given
#: (another process took them between choosing and binding).
PORT_ATTEMPTS = 3

#: Lines of a failed component's log printed with the error.
LOG_TAIL_LINES = 25

#: The fake node `up` creates when no other is asked for.
DEFAULT_NODE = "kwok-node-0"

COMPONENT_ORDER = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


class ClusterError(Exception):
    """A cluster operation failed; the message says what to do."""


class PortInUseError(ClusterError):
    """A component could not bind a port that was free when it was chosen."""


def default_dir() -> Path:
    """Where `kubetask cluster` keeps its cluster unless `--dir` says otherwise."""
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(os.environ.get("KUBETASK_CLUSTER_DIR") or Path(state_home) / "kubetask" / "cluster")


def build_binaries() -> Path:
    """Build (once, cached) the control-plane binaries and return their directory."""
    try:
        completed = subprocess.run(
            ["bash", str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True
        )
    except FileNotFoundError as exc:  # pragma: no cover - bash is everywhere we run
        raise ClusterError("bash is needed to build the control plane.") from exc
    except subprocess.CalledProcessError as exc:
        raise ClusterError("Building the control plane failed; see the messages above.") from exc
    return Path(completed.stdout.strip().splitlines()[-1])


@dataclasses.dataclass
class ClusterState:
    """What `cluster.json` records about a running cluster."""

    directory: str
    bin_dir: str
    server: str
    kubeconfig: str
    token: str
    pids: dict[str, int]
    ports: dict[str, int]

    @classmethod
    def load(cls, directory: Path) -> ClusterState | None:
        path = directory / STATE_FILE
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))

    def save(self) -> None:
        path = Path(self.directory) / STATE_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    def live_pids(self) -> dict[str, int]:
        return {name: pid for name, pid in self.pids.items() if pid_alive(pid)}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process reused the pid
        return True
    # A zombie still answers kill(0); it is dead for our purposes.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _openssl(*args: str) -> None:
    try:
        subprocess.run(["openssl", *args], check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise ClusterError("openssl is needed to create the cluster's certificates.") from exc
    except subprocess.CalledProcessError as exc:
        raise ClusterError(f"openssl {args[0]} failed: {exc.stderr.strip()}") from exc


def _make_pki(pki: Path) -> None:
    """A CA, the API server's serving certificate for loopback, and the service-account key."""
    pki.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
        "-keyout", str(pki / "ca.key"), "-out", str(pki / "ca.crt"),
        "-subj", "/CN=kubetask-local-ca",
    )  # fmt: skip
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes",
        "-keyout", str(pki / "apiserver.key"), "-out", str(pki / "apiserver.csr"),
        "-subj", "/CN=kube-apiserver",
    )  # fmt: skip
    (pki / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "x509", "-req", "-days", "3650", "-in", str(pki / "apiserver.csr"),
        "-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"), "-CAcreateserial",
        "-extfile", str(pki / "san.ext"), "-out", str(pki / "apiserver.crt"),
    )  # fmt: skip
    _openssl("genrsa", "-out", str(pki / "sa.key"), "2048")


def _kubeconfig(server: str, ca_file: Path, token: str) -> str:
    # JSON is valid YAML, and every Kubernetes client reads it.
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kubetask",
                "cluster": {"server": server, "certificate-authority": str(ca_file)},
            }
        ],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "kubetask", "context": {"cluster": "kubetask", "user": "admin"}}],
        "current-context": "kubetask",
    }
    return json.dumps(config, indent=2) + "\n"


class _Launcher:
    """Starts components as daemons with their own logs, and stops them all if one fails."""

    def __init__(self, directory: Path, bin_dir: Path) -> None:
        self.directory = directory
        self.bin_dir = bin_dir
        self.pids: dict[str, int] = {}

    def start(self, name: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        extra = shlex.split(os.environ.get(_extra_args_variable(name), ""))
        log_path = self.directory / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            # A new session: the components outlive `cluster up` and ignore the terminal's ^C.
            process = subprocess.Popen(
                [str(self.bin_dir / name), *args, *extra],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pids[name] = process.pid
        return process

    def log(self, name: str) -> Path:
        return self.directory / "logs" / f"{name}.log"

    def stop_all(self) -> None:
        _stop_pids(self.pids)


def _extra_args_variable(component: str) -> str:
    """E.g. KUBETASK_KUBE_APISERVER_EXTRA_ARGS: extra flags for one component, for debugging."""
    return f"KUBETASK_{component.upper().replace('-', '_')}_EXTRA_ARGS"


def _stop_pids(pids: dict[str, int], grace_seconds: float = 10.0) -> None:
    # Stop in reverse start order so that clients go before the servers they talk to.
    ordered = sorted(pids.items(), key=lambda item: -_component_rank(item[0]))
    for _, pid in ordered:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and any(pid_alive(pid) for _, pid in ordered):
        time.sleep(0.1)
    for _, pid in ordered:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for _, pid in ordered:
        # Reap children of this process so they do not linger as zombies.
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def _component_rank(name: str) -> int:
    return COMPONENT_ORDER.index(name) if name in COMPONENT_ORDER else len(COMPONENT_ORDER)


def _wait_healthy(
    *,
    name: str,
    process: subprocess.Popen[bytes],
    url: str,
    log: Path,
    token: str | None = None,
    ca_file: Path | None = None,
    verify: bool = True,
) -> None:
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = _tail(log)
            if "address already in use" in text:
                raise PortInUseError(f"{name} could not bind its port.")
            raise ClusterError(
                f"{name} exited with code {process.returncode} while starting. "
                f"Last lines of {log}:\n{text}"
            )
        with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
            request = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(request, timeout=2, context=context) as response:
                body = response.read().decode()
                if response.status == 200 and ("ok" in body or "true" in body):
                    return
        time.sleep(0.2)
    raise ClusterError(
        f"{name} did not become healthy within {START_TIMEOUT_SECONDS:.0f} s. "
        f"Last lines of {log}:\n{_tail(log)}"
    )


def _start_components(directory: Path, bin_dir: Path, token: str) -> ClusterState:
    pki = directory / "pki"
    ports = {
        "etcd": _free_port(),
        "etcd-peer": _free_port(),
        "apiserver": _free_port(),
        "scheduler": _free_port(),
        "controller-manager": _free_port(),
    }
    server = f"https://127.0.0.1:{ports['apiserver']}"
    kubeconfig = directory / "kubeconfig"
    kubeconfig.write_text(_kubeconfig(server, pki / "ca.crt", token))
    launcher = _Launcher(directory, bin_dir)
    try:
        etcd_url = f"http://127.0.0.1:{ports['etcd']}"
        peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
        etcd = launcher.start(
            "etcd",
            [
                "--name=kubetask",
                f"--data-dir={directory / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=kubetask={peer_url}",
                # No fsync: this data is thrown away with the cluster; never do this in production.
                "--unsafe-no-fsync",
                "--quota-backend-bytes=8589934592",
            ],
        )
        _wait_healthy(name="etcd", process=etcd, url=f"{etcd_url}/health", log=launcher.log("etcd"))

        apiserver = launcher.start(
            "kube-apiserver",
            [
                f"--etcd-servers={etcd_url}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--secure-port={ports['apiserver']}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                # The `kubernetes` Service endpoint cannot point at loopback; nothing here needs it.
                "--endpoint-reconciler-type=none",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--authorization-mode=Node,RBAC",
                f"--token-auth-file={directory / 'tokens.csv'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.key'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                # Pods run under KWOK have no containers, so they need no token volumes; fake nodes
                # are Ready from the start, and without the node lifecycle controller nobody would
                # lift the not-ready taint that TaintNodesByCondition puts on new nodes.
                "--disable-admission-plugins=ServiceAccount,TaintNodesByCondition",
                "--allow-privileged=true",
                # Benchmarks and tests create thousands of objects quickly; the defaults would
                # throttle them long before etcd is the limit.
                "--max-requests-inflight=2000",
                "--max-mutating-requests-inflight=1000",
            ],
        )
        _wait_healthy(
            name="kube-apiserver",
            process=apiserver,
            url=f"{server}/readyz",
            log=launcher.log("kube-apiserver"),
            token=token,
            ca_file=pki / "ca.crt",
        )

        common = [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
        ]
        controller_manager = launcher.start(
            "kube-controller-manager",
            [
                *common,
                f"--secure-port={ports['controller-manager']}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=false",
                # KWOK keeps the fake nodes Ready; node lifecycle would taint them on a late
                # heartbeat, and IPAM has no pod network to manage.
                "--controllers=*,-node-ipam-controller,-node-lifecycle-controller",
            ],
        )
        scheduler = launcher.start(
            "kube-scheduler", [*common, f"--secure-port={ports['scheduler']}"]
        )
        kwok = launcher.start(
            "kwok",
            [
                f"--kubeconfig={kubeconfig}",
                "--manage-all-nodes=true",
                f"--config={bin_dir / 'kwok-stages.yaml'}",
                "--server-address=",
            ],
        )
        for name, process, port in (
            ("kube-controller-manager", controller_manager, ports["controller-manager"]),
            ("kube-scheduler", scheduler, ports["scheduler"]),
        ):
            # Both serve /healthz over a self-signed certificate of their own; reaching it
            # proves they started, so that certificate is not checked.
            _wait_healthy(
                name=name,
                process=process,
                url=f"https://127.0.0.1:{port}/healthz",
                log=launcher.log(name),
                verify=False,
            )
        time.sleep(0.2)
        if kwok.poll() is not None:
            raise ClusterError(
                f"kwok exited with code {kwok.returncode} while starting. "
                f"Last lines of {launcher.log('kwok')}:\n{_tail(launcher.log('kwok'))}"
            )
    except BaseException:
        launcher.stop_all()
        raise
    return ClusterState(
        directory=str(directory),
        bin_dir=str(bin_dir),
        server=server,
        kubeconfig=str(kubeconfig),
        token=token,
        pids=launcher.pids,
        ports=ports,
    )


def up(directory: Path, *, nodes: Sequence[str] = (DEFAULT_NODE,)) -> ClusterState:
    """Start a cluster in `directory` and wait until it is ready; refuses if one runs there."""
    existing = ClusterState.load(directory)
    if existing is not None and existing.live_pids():
        raise ClusterError(
            f"A cluster is already running in {directory} (pids "
            f"{sorted(existing.live_pids().values())}); use `kubetask cluster down` first."
        )

    bin_dir = build_binaries()
    if directory.exists():
        # Only a stopped cluster's leftovers can be here: the check above saw no live process.
        _remove_tree(directory)
    directory.mkdir(parents=True)
    _make_pki(directory / "pki")
    token = os.urandom(24).hex()
    (directory / "tokens.csv").write_text(f'{token},admin,admin-uid,"system:masters"\n')

    started = time.monotonic()
    for attempt in range(1, PORT_ATTEMPTS + 1):
        try:
            state = _start_components(directory, bin_dir, token)
            break
        except PortInUseError as exc:
            if attempt == PORT_ATTEMPTS:
                raise ClusterError(f"{exc} Gave up after {attempt} sets of ports.") from exc
            logger.warning("%s Retrying with other ports.", exc)
            _remove_tree(directory / "etcd")
    state.save()
    try:
        for node in nodes:
            create_node(state, node)
    except BaseException:
        down(directory)
        raise
    logger.info("Cluster in %s is ready after %.1f s.", directory, time.monotonic() - started)
    return state


def down(directory: Path) -> bool:
    """Stop every process of the cluster in `directory` and delete its data.

    Returns False when there was nothing to stop.
    """
    state = ClusterState.load(directory)
    if state is None:
        return False
    _stop_pids(state.pids)
    _remove_tree(directory)
    return True


def env_lines(directory: Path) -> list[str]:
    """Shell lines that point kubectl and clients at the cluster in `directory`."""
    state = ClusterState.load(directory)
    if state is None:
        raise ClusterError(f"No cluster in {directory}; start one with `kubetask cluster up`.")
    return [
        f"export KUBECONFIG={shlex.quote(state.kubeconfig)}",
        f'export PATH={shlex.quote(state.bin_dir)}:"$PATH"',
    ]


def create_node(state: ClusterState, name: str, labels: dict[str, str] | None = None) -> None:
    """Create a fake Node that KWOK keeps Ready; tests give it their own labels."""
    node: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                **(labels or {}),
            },
        },
        "status": {
            "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "2000"},
            "capacity": {"cpu": "64", "memory": "256Gi", "pods": "2000"},
        },
    }
    kubectl(state, "apply", "-f", "-", input=json.dumps(node))


def kubectl(state: ClusterState, *args: str, input: str | None = None) -> str:
    """Run the cluster's kubectl as the admin and return its output."""
    completed = subprocess.run(
        [str(Path(state.bin_dir) / "kubectl"), f"--kubeconfig={state.kubeconfig}", *args],
        input=input,
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise ClusterError(f"kubectl {' '.join(args)} failed: {completed.stderr.strip()}")
    return completed.stdout


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def running(directory: Path) -> Iterator[ClusterState]:
    """A cluster for the duration of a `with` block (used by tests and benchmarks)."""
    state = up(directory)
    try:
        yield state
    finally:
        down(directory)
