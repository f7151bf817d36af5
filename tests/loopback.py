"""Helpers for loopback Flower 1.41 deployments in tests (no tests here).

One SuperLink and its SuperNodes on 127.0.0.1, each a real `flower-superlink` / `flower-supernode` process, driven
by the `flwr` CLI through a private FLWR_HOME. Either insecure (plain HTTP), or TLS with a throw-away CA made here
with the `cryptography` package; with TLS, optionally SuperNode authentication:

* SuperLink: `flower-superlink --ssl-ca-certfile CA --ssl-certfile CERT --ssl-keyfile KEY [--enable-supernode-auth]`
  (one HTTP(S) server on --host/--port serves the Fleet, Control and Runtime APIs in 1.41);
* SuperNode: `flower-supernode --root-certificates CA --superlink 127.0.0.1:PORT
  [--auth-supernode-private-key KEY]` (an EC key in OpenSSH format, e.g. `ssh-keygen -t ecdsa -b 384`);
* CLI: `[superlink.<name>]` in $FLWR_HOME/config.toml with `root-certificates = CA`;
* registration (1.41): `flwr supernode register PUBLIC_KEY <name>` (Control API) before the SuperNode starts; the
  CSV `--auth-list-public-keys` of older releases makes a 1.41 SuperLink exit.

Every process started is stopped by pid, with the descendants seen while it ran (SuperExec, ServerApp, ClientApps).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable

import pytest

BIN = Path(sys.executable).parent
CONNECTION = "deploy"  # name of the SuperLink connection written to config.toml


# ---- certificates and keys ----
@dataclass(frozen=True)
class TLSFiles:
    ca: Path    # CA certificate: --ssl-ca-certfile, --root-certificates, root-certificates in config.toml
    cert: Path  # server certificate for 127.0.0.1 / localhost (signed by ca): --ssl-certfile
    key: Path   # server private key: --ssl-keyfile


def make_tls(folder: Path, hosts: Iterable[str] = ("127.0.0.1", "localhost", "::1"), days: int = 2) -> TLSFiles:
    """A self-signed CA and a server certificate it signs, for the given IP addresses / DNS names."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "progfl test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))

    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))

    files = TLSFiles(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    files.key.chmod(0o600)
    return files


def make_node_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode key pair as `ssh-keygen -t ecdsa -b 384 -N '' -f NAME` writes it: (private key, NAME.pub)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


# ---- process handling: every process started is stopped by pid, with its descendants ----
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _table() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, session id, start time) of every live (non-zombie) process."""
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                f = (p / "stat").read_text().rsplit(")", 1)[1].split()
                if f[0] != "Z":
                    out[int(p.name)] = (int(f[1]), int(f[3]), int(f[19]))
            except (OSError, IndexError, ValueError):
                continue
    return out


def descendants(pid: int, table: dict[int, tuple[int, int, int]] | None = None) -> list[int]:
    table = _table() if table is None else table
    tree: dict[int, list[int]] = {}
    for c, (ppid, _, _) in table.items():
        tree.setdefault(ppid, []).append(c)
    out, todo = [], [pid]
    while todo:
        for c in tree.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot): tells a pid seen earlier from a reused one."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def snapshot(procs: Iterable[subprocess.Popen], into: dict[int, int | None]) -> dict[int, int | None]:
    """Add to `into` (pid -> start time) the live descendants of procs, and the live members of their sessions
    (procs started with start_new_session=True: this also finds a child orphaned when its parent exited, e.g. the
    SuperExec of a SuperNode the SuperLink refused). Call it while a run goes on: SuperExec / ServerApp / ClientApp
    processes come and go; Flower starts the SuperLink's SuperExec in a session of its own, found as a child."""
    table = _table()
    sessions = {p.pid for p in procs}
    for p in procs:
        if p.poll() is None:
            for pid in descendants(p.pid, table):
                into.setdefault(pid, table[pid][2])
    for pid, (_, sid, t) in table.items():
        if sid in sessions and pid not in sessions:
            into.setdefault(pid, t)
    return into


def _live(seen: dict[int, int | None]) -> set[int]:
    return {pid for pid, t in seen.items() if alive(pid) and (t is None or start_time(pid) == t)}


def stop(procs: list[subprocess.Popen], extra: Iterable[int] | dict[int, int | None] = ()) -> list[int]:
    """SIGTERM each started process and every descendant / session member seen (by pid), wait, SIGKILL what
    remains. extra: pids seen earlier; as a `snapshot` dict (pid -> start time), a pid reused since is left alone.
    Returns the pids still alive afterwards (should be [])."""
    seen = dict(extra) if isinstance(extra, dict) else dict.fromkeys(extra)
    snapshot(procs, seen)
    pids = _live(seen) | {p.pid for p in procs if p.poll() is None}
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 20
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    while time.time() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.2)
    snapshot(procs, seen)  # anything started meanwhile in the sessions
    for pid in _live(seen) | {p.pid for p in procs if p.poll() is None}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    time.sleep(0.5)
    snapshot(procs, seen)
    return sorted(_live(seen) | {p.pid for p in procs if p.poll() is None})


def flwr_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def flwr_json(args: list[str], env: dict[str, str], timeout: float = 120) -> dict:
    """`flwr ARGS --format json`; the JSON object it prints (also on failure: {"success": false, ...})."""
    r = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], env=env, capture_output=True, text=True,
                       timeout=timeout)
    start = r.stdout.find("{")
    if start < 0:
        raise AssertionError(f"flwr {' '.join(args)} printed no JSON:\n{r.stdout}\n{r.stderr}")
    return json.loads(r.stdout[start:])


# ---- a deployment ----
class Deployment:
    """A SuperLink on 127.0.0.1 plus SuperNodes, in `root` (logs, homes, state.db). Use as a context manager:
    leaving it stops every process; `left` then lists pids still alive (should be empty).

        with Deployment(tmp_path, tls=True, auth=True) as d:
            d.start_superlink()
            d.register(public_key)
            d.start_supernode("node0", 'memory-mb=64 ...', private_key=key)
            run_id = d.run(app, run_config)
            assert d.wait(run_id) == "finished:completed"
        assert not d.left
    """

    def __init__(self, root: Path, tls: bool = True, auth: bool = False, superlink_args: Iterable[str] = ()):
        if auth and not tls:
            raise ValueError("SuperNode authentication requires TLS")
        self.root, self.tls, self.auth = Path(root), tls, auth
        self.root.mkdir(parents=True, exist_ok=True)
        self.certs = make_tls(self.root / "tls") if tls else None
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.superlink_args = list(superlink_args)
        self.procs: list[subprocess.Popen] = []
        self.superlink: subprocess.Popen | None = None
        self.nodes: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, int | None] = {}  # descendants seen: pid -> start time
        self.left: list[int] = []
        self._logs: list[IO] = []
        self.cli_env = flwr_env(self.root / "home-cli")
        self._write_cli_config()

    # -- processes
    def _popen(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.log_path(name), "w")
        self._logs.append(log)
        p = subprocess.Popen(argv, env=flwr_env(self.root / f"home-{name}"), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)  # its session id tells its orphans (see snapshot)
        self.procs.append(p)
        return p

    def log_path(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def log(self, name: str) -> str:
        return self.log_path(name).read_text(errors="replace")

    def _tls_args(self, server: bool) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        if server:
            return ["--ssl-ca-certfile", str(self.certs.ca), "--ssl-certfile", str(self.certs.cert),
                    "--ssl-keyfile", str(self.certs.key)]
        return ["--root-certificates", str(self.certs.ca)]

    def start_superlink(self, ready_timeout: float = 60) -> subprocess.Popen:
        argv = [str(BIN / "flower-superlink"), *self._tls_args(server=True), "--host", "127.0.0.1",
                "--port", str(self.port), "--database", str(self.root / "state.db"),
                "--disable-runtime-dependency-installation", *self.superlink_args]
        if self.auth:
            argv.append("--enable-supernode-auth")
        self.superlink = self._popen("superlink", argv)
        self.wait_ready(ready_timeout)
        return self.superlink

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the Control API answers (`flwr supernode ls`)."""
        deadline = time.time() + timeout
        while True:
            if self.superlink is not None and self.superlink.poll() is not None:
                raise AssertionError(f"SuperLink exited ({self.superlink.returncode}):\n"
                                     f"{self.log('superlink')[-3000:]}")
            try:
                if flwr_json(["supernode", "ls", CONNECTION], self.cli_env, timeout=60).get("success"):
                    return
            except (AssertionError, subprocess.TimeoutExpired, json.JSONDecodeError):
                pass
            if time.time() > deadline:
                raise AssertionError(f"SuperLink not ready in {timeout:g} s:\n{self.log('superlink')[-3000:]}")
            time.sleep(1)

    def start_supernode(self, name: str, node_config: str = "", private_key: Path | None = None,
                        extra_args: Iterable[str] = ()) -> subprocess.Popen:
        """A SuperNode connecting to this SuperLink; with private_key, it authenticates with that key (whose public
        key must have been registered, see `register`, or the SuperLink refuses it)."""
        argv = [str(BIN / "flower-supernode"), *self._tls_args(server=False), "--superlink", self.address,
                "--port", str(free_port())]
        if private_key is not None:
            argv += ["--auth-supernode-private-key", str(private_key)]
        if node_config:
            argv += ["--node-config", node_config]
        p = self._popen(name, [*argv, *extra_args])
        self.nodes[name] = p
        return p

    def track(self) -> None:
        """Remember the descendants (SuperExec, ServerApp, ClientApps) of every started process while they exist."""
        snapshot(self.procs, self.seen)

    def stop(self) -> list[int]:
        self.track()
        self.left = stop(self.procs, self.seen)
        for f in self._logs:
            f.close()
        self._logs.clear()
        return self.left

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the flwr CLI
    def _write_cli_config(self) -> None:
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{self.address}"']
        lines.append(f'root-certificates = "{self.certs.ca}"' if self.certs else "insecure = true")
        (self.root / "home-cli" / "config.toml").write_text("\n".join(lines) + "\n")

    def flwr(self, args: list[str], timeout: float = 120) -> dict:
        return flwr_json(args, self.cli_env, timeout)

    def register(self, public_key: Path, name: str | None = None) -> int:
        """`flwr supernode register PUBLIC_KEY` (Control API); the node id the SuperLink gives that key."""
        args = ["supernode", "register", str(public_key), CONNECTION]
        if name:
            args += ["--name", name]
        out = self.flwr(args)
        assert out.get("success"), out
        return int(out["node-id"])

    def supernodes(self) -> list[dict]:
        """`flwr supernode ls`: [{"node-id": "...", "status": "registered|online|offline|unregistered", ...}]."""
        out = self.flwr(["supernode", "ls", CONNECTION])
        assert out.get("success"), out
        return out["nodes"]

    def wait_online(self, node_ids: Iterable[int], timeout: float = 60) -> None:
        want = {str(n) for n in node_ids}
        deadline = time.time() + timeout
        while True:
            self.track()
            online = {n["node-id"] for n in self.supernodes() if n["status"] == "online"}
            if want <= online:
                return
            if time.time() > deadline:
                raise AssertionError(f"nodes {sorted(want - online)} not online in {timeout:g} s")
            time.sleep(1)

    def run(self, app: Path, run_config: str = "", timeout: float = 60) -> int:
        """`flwr run APP <connection> --run-config ...`, retried while the SuperLink does not accept it yet."""
        args = ["run", str(app), CONNECTION] + (["--run-config", run_config] if run_config else [])
        deadline = time.time() + timeout
        while True:
            started = self.flwr(args)
            if started.get("success") or time.time() > deadline:
                break
            time.sleep(2)
        assert started.get("success"), started
        return int(started["run-id"])

    def status(self, run_id: int) -> str:
        runs = self.flwr(["ls", CONNECTION, "--run-id", str(run_id)], timeout=60)["runs"]
        return runs[0]["status"] if runs else ""

    def run_log(self, run_id: int) -> str:
        """The run's ServerApp log as the SuperLink keeps it (`flwr log RUN_ID <connection> --show`): where a
        ServerApp exception shows, not in superlink.log."""
        r = subprocess.run([str(BIN / "flwr"), "log", str(run_id), CONNECTION, "--show"], env=self.cli_env,
                           capture_output=True, text=True, timeout=60)
        return r.stdout + r.stderr

    def run_to_completion(self, app: Path, run_config: str, timeout: float, logs: Iterable[str] = ()) -> int:
        """run + wait; a run that does not complete fails the test with the ServerApp's log and the named process
        logs."""
        run_id = self.run(app, run_config)
        status = self.wait(run_id, timeout=timeout)
        if status != "finished:completed":
            tails = "".join(f"\n--- {name}.log:\n{self.log(name)[-2000:]}" for name in logs)
            pytest.fail(f"run {run_id}: {status!r}\n--- ServerApp log:\n{self.run_log(run_id)[-4000:]}{tails}")
        return run_id

    def wait(self, run_id: int, timeout: float = 150, poll: float = 2) -> str:
        """Poll `flwr ls` until the run's status is finished:* (or timeout); returns the last status."""
        status, deadline = "", time.time() + timeout
        while time.time() < deadline:
            self.track()
            status = self.status(run_id)
            if status.startswith("finished"):
                break
            time.sleep(poll)
        return status
