"""progfl.server.workers.DevicePool: a fresh forkserver process per job; failures stay with their job; no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from multiprocessing import forkserver
from pathlib import Path

import numpy as np

from progfl.server.workers import DevicePool, JobFailed

from loopback import alive, descendants

# the forkserver is one per test process and keeps the preload of its first start: every test passes the same
PRELOAD = ["progfl.server.workers", "xml.dom.minidom"]
ROOT = Path(__file__).resolve().parent.parent


# ---- jobs (module level: they are pickled by reference into the job processes) ----
def _square(x: int) -> np.ndarray:
    if x == 3:
        raise ValueError(f"no {x}s here\nsecond line")
    return np.full(1_000_000, x, dtype=np.float32)  # 4 MB: bigger than a pipe buffer


def _wait_then(folder: str, name: str, seconds: float) -> str:
    """Announce the job's pid in folder/name, then sleep."""
    Path(folder, name).write_text(str(os.getpid()))
    time.sleep(seconds)
    return name


def _whoami() -> tuple[int, bool, int]:
    rss_kb = int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                      if line.startswith("VmRSS:")).split()[1])
    return os.getppid(), "xml.dom.minidom" in sys.modules, rss_kb


# ---- processes (zombies included: a job's slot is free once it is reaped) ----
def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(p.name))
    return tree


def _grandchildren(pid: int) -> list[int]:
    tree = _children()
    return [c for child in tree.get(pid, []) for c in tree.get(child, [])]


def _wait_for_files(folder: Path, count: int, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while (found := len(list(folder.iterdir()))) < count:
        assert time.time() < deadline, f"only {found} of {count} jobs started"
        time.sleep(0.02)


def _signal_job_when_started(folder: Path, name: str, sig: int) -> threading.Thread:
    def send():
        path = folder / name
        deadline = time.time() + 20
        while not path.exists() or not path.read_text():
            if time.time() > deadline:
                return
            time.sleep(0.02)
        os.kill(int(path.read_text()), sig)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def _map(workers: int, fn, jobs: list[tuple], timeout: float = 30.0) -> list:
    """DevicePool(workers).map in a thread: a pool that deadlocks fails the test instead of hanging the run."""
    pool, box = DevicePool(workers, PRELOAD), []

    def run():
        try:
            box.append(pool.map(fn, jobs))
        except BaseException as e:  # noqa: BLE001  (re-raised in the test)
            box.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert box, f"map did not return within {timeout} s"
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


# ---- tests ----
def test_results_in_order_and_an_error_stays_with_its_job():
    out = _map(2, _square, [(x,) for x in range(5)])
    assert out[3] == JobFailed("ValueError: no 3s here")
    for x in (0, 1, 2, 4):
        assert isinstance(out[x], np.ndarray) and out[x].shape == (1_000_000,) and (out[x] == x).all()


def test_a_killed_job_fails_alone(tmp_path):
    sender = _signal_job_when_started(tmp_path, "victim", signal.SIGKILL)
    out = _map(2, _wait_then, [(str(tmp_path), "victim", 30), (str(tmp_path), "a", 0.5), (str(tmp_path), "b", 0.5),
                               (str(tmp_path), "c", 0.5)], timeout=15)  # the killed job's 30 s are not waited for
    sender.join()
    assert out == [JobFailed("device process died (signal 9)"), "a", "b", "c"]


def test_jobs_ignore_sigint(tmp_path):
    sender = _signal_job_when_started(tmp_path, "interrupted", signal.SIGINT)
    out = _map(1, _wait_then, [(str(tmp_path), "interrupted", 1.0)])
    sender.join()
    assert out == ["interrupted"]


WHOAMI = """
import sys
sys.path.insert(0, {tests!r})
import numpy as np
from progfl.server.workers import DevicePool
from test_workers import PRELOAD, _whoami

if __name__ == "__main__":
    ballast = np.ones(200 * 2**20, dtype=np.uint8)  # 200 MB in the server: a child forked from it would map them
    from multiprocessing import forkserver
    (ppid, preloaded, rss_kb), = DevicePool(1, PRELOAD).map(_whoami, [()])
    print(ppid, forkserver._forkserver._forkserver_pid, preloaded, rss_kb, ballast.sum() == ballast.size)
"""


def test_jobs_fork_from_the_preloaded_forkserver_not_the_server(tmp_path):
    """In a fresh server process: the forkserver is one per process and keeps the preload of its first start (in the
    test session another test may have started it)."""
    script = tmp_path / "whoami.py"
    script.write_text(WHOAMI.format(tests=str(ROOT / "tests")))
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    ppid, server, preloaded, rss_kb, ok = r.stdout.split()
    assert ppid == server and preloaded == "True" and ok == "True"
    assert int(rss_kb) < 150 * 1024, rss_kb


def test_at_most_workers_processes_at_once(tmp_path):
    DevicePool(2, PRELOAD)  # starts the forkserver, whose children the jobs are
    server = forkserver._forkserver._forkserver_pid
    most, done = 0, threading.Event()

    def count():
        nonlocal most
        while not done.is_set():
            most = max(most, len(_children().get(server, [])))  # zombies too: a slot is free once reaped
            time.sleep(0.005)

    counter = threading.Thread(target=count, daemon=True)
    counter.start()
    out = _map(2, _wait_then, [(str(tmp_path), str(i), 0.3) for i in range(6)])
    done.set()
    counter.join()
    assert out == [str(i) for i in range(6)]
    assert most == 2


SERVER = """
import sys, time
sys.path.insert(0, {tests!r})
from progfl.server.workers import DevicePool
from test_workers import PRELOAD, _wait_then

folder, seconds, jobs, import_seconds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
if __name__ == "__mp_main__":  # each job process imports this main module again: slowly, like a big entry point
    time.sleep(import_seconds)
if __name__ == "__main__":
    print(DevicePool(2, PRELOAD).map(_wait_then, [(folder, str(i), seconds) for i in range(jobs)]))
"""


def _server(tmp_path: Path, seconds: float, jobs: int, import_seconds: float) -> tuple[subprocess.Popen, Path]:
    """A server process running DevicePool(2).map over `jobs` jobs that announce their pids in the returned folder."""
    folder = tmp_path / "started"
    folder.mkdir()
    script = tmp_path / "server.py"
    script.write_text(SERVER.format(tests=str(ROOT / "tests")))
    args = [sys.executable, str(script), str(folder), str(seconds), str(jobs), str(import_seconds)]
    return subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), folder


def test_no_orphans_after_the_server_is_killed(tmp_path):
    server, folder = _server(tmp_path, seconds=60, jobs=3, import_seconds=0)
    pids: list[int] = []
    try:
        _wait_for_files(folder, 2)
        pids = descendants(server.pid)
        names = " ".join(Path(f"/proc/{p}/cmdline").read_text() for p in pids)
        assert len(pids) == 4 and "forkserver" in names and "resource_tracker" in names, names  # + 2 jobs
        os.kill(server.pid, signal.SIGKILL)
        server.communicate()
        deadline = time.time() + 10
        while (left := [p for p in pids if alive(p)]) and time.time() < deadline:
            time.sleep(0.05)
        assert not left, [Path(f"/proc/{p}/cmdline").read_text() for p in left]
        assert len(list(folder.iterdir())) == 2  # the third job never started
    finally:  # a failed test must not leave its processes either
        server.kill()
        server.communicate()
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)


def test_a_ctrl_c_while_a_job_process_starts_is_ignored(tmp_path):
    """Before the job's own code runs (here: while it imports the main module again) SIGINT must not land either."""
    server, folder = _server(tmp_path, seconds=0.1, jobs=1, import_seconds=1.5)
    try:
        deadline = time.time() + 20
        while not (jobs := _grandchildren(server.pid)):  # the forkserver's children
            assert time.time() < deadline and server.poll() is None, "no job process started"
            time.sleep(0.01)
        os.kill(jobs[0], signal.SIGINT)
        assert not list(folder.iterdir())  # the signal came before the job's own code
        out, err = server.communicate(timeout=30)
        assert (server.returncode, out.strip(), err) == (0, "['0']", "")
    finally:
        server.kill()
        server.communicate()
