"""The tower worker: a child process that runs the towers, so a crash of a runtime (ONNX Runtime, OpenVINO, TensorRT;
a segfault, the OOM killer, kill -9) costs the requests of one batch a 503, never the server.

    python -m fvgpt_serving.engine.tower_worker --fd FD [--threads N]

FD is one end of a Unix socket pair whose other end the engine holds (engine/towers.py, ProcessWorker). Commands and
answers are pickled tuples on it (multiprocessing's Connection framing); pixels and features never are: each tower
has a shared-memory region (a memfd, its descriptor passed over the socket with SCM_RIGHTS when the tower is opened)
holding an input block (max_batch, 3, S, S) and an output block (max_batch, *shape) of float32.

A tower is one graph of a bundle (TowerSpec). Most read pixels; a tower of a bundle with several roles may read
another tower's output instead (MMRL's CLIP branch and MMRL branch read its trunk): such a reader has no input block,
and its source's output never leaves the worker when the engine reads none of it (the trunk's tokens: no output
block). A source runs once per batch for all its readers.

    ("open", spec, max_batch) + region fd   → ("ok", info) | ("error", message)
    ("close", tower_id)                      → ("ok", None)
    ("run", [(tower_id, n, readers), ...])   → ("ok", [(wall_s, cpu_s), ...]) | ("error", message)
        each tower runs on the first n rows of its input block and writes the first n rows of its output block; then
        each reader (tower_id, rows) of it on its output's rows (None: all n), writing len(rows) rows of its own block

The worker ignores SIGINT and SIGTERM (a Ctrl-C in a terminal signals the whole process group, and the server drains
its requests first); it exits when the engine closes its end of the socket, or when killed.
"""
from __future__ import annotations

import argparse
import math
import mmap
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping
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
    read again from the bundle's manifest. One per tower role (docs/bundle-format.md, "Tower roles"): `tower_id` is
    the role's key (Manifest.tower_keys: bundles that share it share the computation), `source` the tower id whose
    output it reads (None: pixels), `shape` the per-image shape of what the engine reads back (None: (D,); (): none,
    the output only feeds readers)."""

    tower_id: str
    bundle: Path
    manifest: Manifest
    runtime: str
    precision: str
    device: str
    role: str = "image"
    source: str | None = None
    shape: tuple[int, ...] | None = None

    @property
    def size(self) -> int:
        return self.manifest.preprocess.size

    @property
    def dim(self) -> int:
        return self.manifest.backbone.embed_dim

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (self.dim,) if self.shape is None else self.shape


class Region:
    """A tower's shared memory: `inputs` (max_batch, 3, S, S) and `outputs` (max_batch, *out_shape), float32; None
    where the tower has no such block (a reader of another tower has no inputs, a source only for readers no
    outputs)."""

    def __init__(self, fd: int, max_batch: int, spec: TowerSpec, create: bool):
        in_shape = (3, spec.size, spec.size) if spec.source is None else None
        out_shape = spec.out_shape or None
        n_in, n_out = (max_batch * math.prod(s) if s else 0 for s in (in_shape, out_shape))
        nbytes = 4 * (n_in + n_out)
        if create:
            os.ftruncate(fd, nbytes)
        self.fd = fd
        self._map = mmap.mmap(fd, nbytes)
        flat = np.frombuffer(self._map, np.float32)
        self.inputs = flat[:n_in].reshape(max_batch, *in_shape) if in_shape else None
        self.outputs = flat[n_in:].reshape(max_batch, *out_shape) if out_shape else None

    @classmethod
    def create(cls, name: str, max_batch: int, spec: TowerSpec) -> Region:
        return cls(os.memfd_create(name, os.MFD_CLOEXEC), max_batch, spec, create=True)

    def close(self) -> None:
        self.inputs = self.outputs = None  # the views must go before the map can close
        try:
            self._map.close()
        except BufferError:  # a view is still held somewhere: the map goes with the last reference
            pass
        os.close(self.fd)


def open_tower(spec: TowerSpec, threads: int | None, source: TowerRunner | None = None) -> TowerRunner:
    """The tower variant, run once on a blank image (a warm-up, and a check of its output shape); `source`: the open
    tower whose output it reads."""
    tower = TowerRunner(spec.bundle, spec.manifest, spec.precision, spec.runtime, spec.device, threads, role=spec.role)
    blank = np.zeros((1, 3, spec.size, spec.size), np.float32)
    out = tower(blank if source is None else source(blank))
    if spec.out_shape and out.shape != (1, *spec.out_shape):
        raise BundleError(f"the tower ({spec.role}) returns {out.shape}, not {(1, *spec.out_shape)} as the bundle's "
                          f"heads read it")
    return tower


def run_group(towers: Mapping[str, TowerRunner], tower_id: str, pixels: np.ndarray,
              readers: list[tuple[str, list[int] | None]], clock: Callable[[], float]
              ) -> tuple[dict[str, np.ndarray], list[tuple[float, float]]]:
    """One tower on a batch of pixels, then each reader of its output on the rows it is asked for (None: all): the
    outputs by tower id, and (wall, `clock` CPU) seconds per tower call. The source runs once for all its readers."""
    outputs: dict[str, np.ndarray] = {}
    stats = []

    def timed(key: str, x: np.ndarray) -> None:
        t0, c0 = time.perf_counter(), clock()
        outputs[key] = towers[key](x)
        stats.append((time.perf_counter() - t0, clock() - c0))

    timed(tower_id, pixels)
    for key, rows in readers:
        timed(key, outputs[tower_id] if rows is None else outputs[tower_id][rows])
    return outputs, stats


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
            region = Region(fds[0], max_batch, spec, create=False)
            try:
                source = towers[spec.source][0] if spec.source is not None else None
                towers[spec.tower_id] = (open_tower(spec, threads, source), region)
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
                runners = {key: tower for key, (tower, _) in towers.items()}
                for tower_id, n, readers in args[0]:
                    outputs, group_stats = run_group(runners, tower_id, towers[tower_id][1].inputs[:n], readers,
                                                     time.process_time)
                    for key, out in outputs.items():
                        if (block := towers[key][1].outputs) is not None:
                            block[:len(out)] = out
                    stats += group_stats
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
