"""Server processes from the outside: a free port, whether a port is taken, waiting until a server is ready,
stopping it (SIGTERM, then SIGKILL of its whole tree), and which of its processes does what. Used by `fvgpt serve`,
the tests and the benchmarks.

A server started by `bentoml serve` (or `fvgpt serve`, which runs it) is a process tree: the arbiter, the API worker
(`_bentoml_impl.worker.service`, where the engine runs) and, under the API worker, the tower worker
(`fvgpt_serving.engine.tower_worker`).
"""
from __future__ import annotations

import errno
import signal
import socket
import subprocess
import time

API_WORKER = "_bentoml_impl.worker.service"
TOWER_WORKER = "fvgpt_serving.engine.tower_worker"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """Whether a server could not listen on host:port now (bound as servers bind, with SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def wait_ready(proc: subprocess.Popen | None, url: str, timeout_s: float, every_s: float = 0.25) -> None:
    """Until GET {url}/readyz answers 200; a RuntimeError if the server (`proc`, when given) exits first or the time
    runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(every_s)
    raise RuntimeError(f"the server was not ready after {timeout_s:.0f} s")


def stop(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM the server (it drains and stops its workers), then SIGKILL every process of its tree if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a server process and all its descendants, by process id: BentoML's workers run in sessions of their
    own, so signalling the server's process group would leave them running."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def rss_mib(server_pid: int) -> dict[str, float]:
    """RSS of the API worker, the tower process and all the server's processes together, in MiB."""
    import psutil

    out = {"api": 0.0, "tower": 0.0, "total": 0.0}
    root = psutil.Process(server_pid)
    roles = {p.pid: role for role, procs in server_processes(server_pid).items() for p in procs}
    for proc in [root, *root.children(recursive=True)]:
        try:
            rss = proc.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            continue
        out["total"] += rss
        if proc.pid in roles:
            out[roles[proc.pid]] += rss
    return out


def server_processes(server_pid: int) -> dict[str, list]:
    """The processes (psutil.Process) of a server started by `bentoml serve` / `fvgpt serve`, by role: "api" (the
    worker running the engine) and "tower" (the process running the towers: the tower worker; in servers before the
    engine, the `fvgpt-encoder` BentoML worker), told apart by their command lines."""
    import psutil

    roles: dict[str, list] = {"api": [], "tower": []}
    for proc in psutil.Process(server_pid).children(recursive=True):
        try:
            cmd = proc.cmdline()
        except psutil.NoSuchProcess:
            continue
        if TOWER_WORKER in cmd or (API_WORKER in cmd and "fvgpt-encoder" in cmd):
            roles["tower"].append(proc)
        elif API_WORKER in cmd:
            roles["api"].append(proc)
    return roles
