"""The tower worker: a child process that runs the towers, so a crash of a runtime (ONNX Runtime, OpenVINO, TensorRT;
a segfault, the OOM killer, kill -9) costs the requests of one batch a 503, never the server.

    python -m fvgpt_serving.engine.tower_worker --fd FD [--threads N]

FD is one end of a Unix socket pair whose other end the engine holds (engine/towers.py, ProcessWorker). Commands and
answers are pickled tuples on it (multiprocessing's Connection framing); pixels and features never are: each tower
has a shared-memory region (a memfd, its descriptor passed over the socket with SCM_RIGHTS when the tower is opened)
holding an input block (max_batch, 3, S, S) and an output block (max_batch, D) of float32.

    ("open", spec, max_batch) + region fd   → ("ok", info) | ("error", message)
    ("close", tower_id)                      → ("ok", None)
    ("run", [(tower_id, n), ...])            → ("ok", [(wall_s, cpu_s), ...]) | ("error", message)
        each tower runs on the first n rows of its input block and writes the first n rows of its output block

The worker ignores SIGINT and SIGTERM (a Ctrl-C in a terminal signals the whole process group, and the server drains
its requests first); it exits when the engine closes its end of the socket, or when killed.
"""
from __future__ import annotations

import argparse
import mmap
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
from fvgpt_runtime.bundle import TowerRunner
from fvgpt_runtime.manifest import BundleError, Manifest

FD_MARK = b"F"  # the byte that carries a region's descriptor (SCM_RIGHTS needs at least one byte of data)


@dataclass(frozen=True)
class TowerSpec:
    """A verified bundle's tower variant, resolved once by the repository: everything needed to open it, nothing
    read again from the bundle's manifest."""

    tower_id: str
    bundle: Path
    manifest: Manifest
    runtime: str
    precision: str
    device: str

    @property
    def size(self) -> int:
        return self.manifest.preprocess.size

    @property
    def dim(self) -> int:
        return self.manifest.backbone.embed_dim


class Region:
    """A tower's shared memory: `inputs` (max_batch, 3, S, S) and `outputs` (max_batch, D), float32."""

    def __init__(self, fd: int, max_batch: int, size: int, dim: int, create: bool):
        n_in, n_out = max_batch * 3 * size * size, max_batch * dim
        nbytes = 4 * (n_in + n_out)
        if create:
            os.ftruncate(fd, nbytes)
        self.fd = fd
        self._map = mmap.mmap(fd, nbytes)
        flat = np.frombuffer(self._map, np.float32)
        self.inputs = flat[:n_in].reshape(max_batch, 3, size, size)
        self.outputs = flat[n_in:].reshape(max_batch, dim)

    @classmethod
    def create(cls, name: str, max_batch: int, size: int, dim: int) -> Region:
        return cls(os.memfd_create(name, os.MFD_CLOEXEC), max_batch, size, dim, create=True)

    def close(self) -> None:
        self.inputs = self.outputs = None  # the views must go before the map can close
        try:
            self._map.close()
        except BufferError:  # a view is still held somewhere: the map goes with the last reference
            pass
        os.close(self.fd)


def open_tower(spec: TowerSpec, threads: int | None) -> TowerRunner:
    """The tower variant, run once on a blank image (a warm-up, and a check of its output shape)."""
    tower = TowerRunner(spec.bundle, spec.manifest, spec.precision, spec.runtime, spec.device, threads)
    out = tower(np.zeros((1, 3, spec.size, spec.size), np.float32))
    if out.shape != (1, spec.dim):
        raise BundleError(f"the tower returns {out.shape}, not (1, {spec.dim}) as the manifest says")
    return tower


def serve(conn: Connection, sock: socket.socket, threads: int | None) -> None:
    towers: dict[str, tuple[TowerRunner, Region]] = {}
    conn.send(("ready", os.getpid()))
    while True:
        try:
            command, *args = conn.recv()
        except (EOFError, OSError):  # the engine is gone: nothing left to serve
            return
        if command == "open":
            spec, max_batch = args
            _, fds, _, _ = socket.recv_fds(sock, 1, 1)
            region = Region(fds[0], max_batch, spec.size, spec.dim, create=False)
            try:
                towers[spec.tower_id] = (open_tower(spec, threads), region)
                conn.send(("ok", {"provider": towers[spec.tower_id][0].provider}))
            except Exception as exc:  # noqa: BLE001 - any failure refuses the tower, the worker keeps serving
                region.close()
                conn.send(("error", f"{type(exc).__name__}: {' '.join(str(exc).split())}"))
        elif command == "close":
            if (found := towers.pop(args[0], None)) is not None:
                found[1].close()
            conn.send(("ok", None))
        elif command == "run":
            stats = []
            try:
                for tower_id, n in args[0]:
                    tower, region = towers[tower_id]
                    t0, c0 = time.perf_counter(), time.process_time()
                    region.outputs[:n] = tower(region.inputs[:n])
                    stats.append((time.perf_counter() - t0, time.process_time() - c0))
            except Exception as exc:  # noqa: BLE001 - the batch fails (its requests get an error), not the worker
                traceback.print_exc()
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
                continue
            conn.send(("ok", stats))
        else:
            conn.send(("error", f"unknown command {command!r}"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fvgpt_serving.engine.tower_worker", description=__doc__)
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=args.fd)
    serve(Connection(os.dup(args.fd)), sock, args.threads or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
