"""The tower pool: every open tower, the batcher that feeds them, and the worker they run in.

Requests hand in pixels per tower (`features`), or per tower and the towers that read its output (`outputs`: MMRL's
trunk and its branches, engine/tower_worker.py); one batcher thread runs one batch at a time. Whatever queued while a
batch ran forms the next one, up to FVGPT_MAX_BATCH_SIZE images counted over all towers (a batch may mix towers: one
tower call per tower in it). Holding a request back to wait for batch mates buys nothing here: while a batch runs
the next one fills anyway, and on a CPU a tower's images/s hardly depend on the batch size. A request whose
estimated wait (the images ahead of it × the recent seconds per image) is over FVGPT_MAX_LATENCY_MS is refused at
once with a 503 and Retry-After instead of waiting without bound.

Where the towers run (FVGPT_TOWER_WORKER):
  process (default)  a child process (engine/tower_worker.py): pixels go into a shared-memory region per tower, one
                     copy, and features come back the same way; only commands cross the socket. If the worker dies,
                     the requests of the batch it ran and those queued get 503 + Retry-After at once, `up` is False
                     at once (readiness answers 503 without touching it), and the batcher starts a new worker and
                     opens every tower again.
  thread             the towers run in the batcher thread of this process (ONNX Runtime and OpenVINO release the
                     GIL). No isolation: a crash of a runtime ends the server. Measured against `process` in
                     serving/README.md ("Transport").
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from .errors import ApiError, retry_later
from .metrics import Metrics
from .settings import Settings
from .tower_worker import FD_MARK, Region, TowerSpec, open_tower, run_group

logger = logging.getLogger("fvgpt.engine")

WORKER_MODULE = "fvgpt_serving.engine.tower_worker"
RESTART_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
EMA = 0.2  # weight of the newest batch in the seconds-per-image estimate


# one tower's rows in a batch: (tower id, its pixel rows, its readers: (tower id, the rows it reads; None: all))
Group = tuple[str, list[np.ndarray], list[tuple[str, list[int] | None]]]


class WorkerDied(Exception):
    pass


class ProcessWorker:
    """The engine's side of one tower worker process (engine/tower_worker.py)."""

    in_this_thread = False  # the towers' CPU time is the worker process's, not the batcher thread's

    def __init__(self, threads: int | None, max_batch: int):
        self.max_batch = max_batch
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.proc = subprocess.Popen([sys.executable, "-m", WORKER_MODULE, "--fd", str(theirs.fileno()),
                                      "--threads", str(threads or 0)], pass_fds=[theirs.fileno()],
                                     stdin=subprocess.DEVNULL)
        theirs.close()
        self.sock = ours
        self.conn = Connection(os.dup(ours.fileno()))
        self.regions: dict[str, Region] = {}
        if not self.conn.poll(60):
            self.kill()
            raise WorkerDied("the tower worker did not start within 60 s")
        self._expect("ready")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _call(self, message: tuple, fd: int | None = None) -> Any:
        try:
            self.conn.send(message)
            if fd is not None:
                socket.send_fds(self.sock, [FD_MARK], [fd])
            status, payload = self.conn.recv()
        except (EOFError, OSError) as exc:
            raise WorkerDied(f"{type(exc).__name__}: {exc}") from None
        if status == "error":
            raise RuntimeError(payload)
        return payload

    def _expect(self, status: str) -> None:
        try:
            got = self.conn.recv()
        except (EOFError, OSError) as exc:
            raise WorkerDied(f"the tower worker exited while starting ({exc})") from None
        if got[0] != status:
            raise WorkerDied(f"the tower worker answered {got!r}")

    def open(self, spec: TowerSpec) -> dict:
        region = Region.create(f"fvgpt-{spec.tower_id}", self.max_batch, spec)
        try:
            info = self._call(("open", spec, self.max_batch), fd=region.fd)
        except BaseException:
            region.close()
            raise
        self.regions[spec.tower_id] = region
        return info

    def close(self, tower_id: str) -> None:
        self._call(("close", tower_id))
        if (region := self.regions.pop(tower_id, None)) is not None:
            region.close()

    def run(self, groups: list[Group]) -> tuple[list[dict[str, np.ndarray]], list[tuple[float, float]]]:
        """Each tower on its rows, then its readers: (per group, the outputs the engine reads by tower id; (wall, cpu)
        seconds of each tower call)."""
        for tower_id, rows, _ in groups:
            inputs = self.regions[tower_id].inputs
            for i, row in enumerate(rows):
                inputs[i] = row
        stats = self._call(("run", [(tower_id, len(rows), readers) for tower_id, rows, readers in groups]))
        out = []
        for tower_id, rows, readers in groups:
            counts = [(tower_id, len(rows))] + [(k, len(rows) if r is None else len(r)) for k, r in readers]
            out.append({k: self.regions[k].outputs[:n].copy() for k, n in counts
                        if self.regions[k].outputs is not None})
        return out, stats

    def kill(self) -> None:
        """Close the socket (the worker exits at EOF), then make sure: SIGKILL after 5 s."""
        for closer in (self.conn.close, self.sock.close):
            try:
                closer()
            except OSError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for region in self.regions.values():
            region.close()
        self.regions.clear()


class ThreadWorker:
    """The towers in this process, run by the batcher thread."""

    in_this_thread = True  # the batcher thread's CPU time includes the towers' calls

    def __init__(self, threads: int | None, max_batch: int):
        self.threads = threads
        self.towers: dict[str, Any] = {}
        self.pid = os.getpid()

    def open(self, spec: TowerSpec) -> dict:
        source = self.towers[spec.source] if spec.source is not None else None
        self.towers[spec.tower_id] = tower = open_tower(spec, self.threads, source)
        return {"provider": tower.provider}

    def close(self, tower_id: str) -> None:
        self.towers.pop(tower_id, None)

    def run(self, groups: list[Group]) -> tuple[list[dict[str, np.ndarray]], list[tuple[float, float]]]:
        out, stats = [], []
        for tower_id, rows, readers in groups:
            outputs, group_stats = run_group(self.towers, tower_id, np.stack(rows), readers, time.thread_time)
            out.append(outputs)
            stats += group_stats
        return out, stats

    def kill(self) -> None:
        self.towers.clear()


WORKERS = {"process": ProcessWorker, "thread": ThreadWorker}


@dataclass(eq=False)
class _Pending:
    """One request's images for one tower (and towers reading its output), until the batcher has run them all."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    tower_id: str
    out: dict[str, np.ndarray]  # the towers asked for → (N, *shape), filled row by row
    remaining: int
    queued: float = field(default_factory=time.perf_counter)


@dataclass
class _Command:
    """An open or close, run by the batcher thread between batches."""

    name: str
    arg: Any
    done: Future = field(default_factory=Future)


def _settle(pending: _Pending, result: np.ndarray | None, error: Exception | None) -> None:
    def settle() -> None:
        if not pending.future.done():
            if error is not None:
                pending.future.set_exception(error)
            else:
                pending.future.set_result(result)

    pending.loop.call_soon_threadsafe(settle)


class TowerPool:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.max_batch = settings.max_batch_size
        self.max_latency_s = settings.max_latency_ms / 1000
        self.threads = settings.threads
        self.kind = settings.tower_worker
        self.metrics = metrics
        self.specs: dict[str, TowerSpec] = {}  # open towers, so a new worker can open them again
        self.info: dict[str, dict] = {}
        self.worker: ProcessWorker | ThreadWorker | None = None
        self.up = False
        self.down_since: float | None = None
        self.restarts = 0
        self._rows: deque[tuple[_Pending, int, np.ndarray]] = deque()
        self._commands: deque[_Command] = deque()
        self._cond = threading.Condition()
        self._dead: str | None = None  # why the worker is gone, until the batcher has replaced it
        self._stopping = False
        self._in_batch = 0
        self._s_per_image = 0.0
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fvgpt-batcher", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(30)

    @property
    def pid(self) -> int | None:
        worker = self.worker
        return worker.pid if worker is not None else None

    def _spawn(self) -> None:
        """Start a worker (retrying with a backoff) and open every known tower in it; then the pool is up."""
        attempt = 0
        while not self._stopping:
            try:
                worker = WORKERS[self.kind](self.threads, self.max_batch)
                break
            except Exception as exc:  # noqa: BLE001 - e.g. no memory for a process: try again
                delay = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]
                logger.warning("fvgpt: cannot start the tower worker (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                attempt += 1
        else:
            return
        if isinstance(worker, ProcessWorker):
            threading.Thread(target=self._watch, args=(worker,), name="fvgpt-worker-watch", daemon=True).start()
        self.worker = worker
        for tower_id, spec in list(self.specs.items()):
            try:
                self.info[tower_id] = self._info(spec, worker.open(spec))
            except Exception as exc:  # noqa: BLE001 - that tower stays closed; its requests get a 503
                logger.warning("fvgpt: cannot open tower %s again: %s", tower_id, exc)
                self.specs.pop(tower_id)
                self.info.pop(tower_id, None)
        if self.down_since is not None:
            logger.info("fvgpt: tower worker %s up again after %.1f s", worker.pid,
                        time.monotonic() - self.down_since)
        with self._cond:
            self.up, self.down_since = True, None

    def _watch(self, worker: ProcessWorker) -> None:
        """Notice at once when the worker exits, even while no batch runs."""
        code = worker.proc.wait()
        self._lost(worker, f"it exited with status {code}")

    def _lost(self, worker: Any, why: str) -> None:
        with self._cond:
            if self._stopping or worker is not self.worker or self._dead is not None:
                return
            self._dead = why
            self.up = False
            self.down_since = time.monotonic()
            self._cond.notify_all()
        logger.warning("fvgpt: the tower worker is down (%s): answering 503 until a new one is up", why)

    # ---- towers ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _info(spec: TowerSpec, opened: dict) -> dict:
        return {"tower_id": spec.tower_id, "runtime": spec.runtime, "provider": opened["provider"],
                "precision": spec.precision}

    async def open(self, spec: TowerSpec) -> dict:
        """Open a tower (once per tower id): its runtime info; an error names why it cannot be opened."""
        if spec.tower_id in self.specs:
            return self.info[spec.tower_id]
        return await self._command("open", spec)

    async def close(self, tower_id: str) -> None:
        if tower_id in self.specs:
            await self._command("close", tower_id)

    async def _command(self, name: str, arg: Any) -> Any:
        command = _Command(name, arg)
        with self._cond:
            self._commands.append(command)
            self._cond.notify_all()
        return await asyncio.wrap_future(command.done)

    def _run_command(self, command: _Command) -> bool:
        """Run one command; False when the worker is gone (the command was not run)."""
        worker = self.worker
        try:
            if worker is None or not self.up:
                raise WorkerDied("down")
            if command.name == "open":
                spec = command.arg
                if spec.tower_id not in self.specs:
                    self.info[spec.tower_id] = self._info(spec, worker.open(spec))
                    self.specs[spec.tower_id] = spec
                    logger.info("fvgpt: opened tower %s (%s-%s) from %s on %s", spec.tower_id, spec.runtime,
                                spec.precision, spec.bundle, self.info[spec.tower_id]["provider"])
                result = self.info[spec.tower_id]
            else:
                self.specs.pop(command.arg, None)
                self.info.pop(command.arg, None)
                worker.close(command.arg)
                logger.info("fvgpt: closed tower %s", command.arg)
                result = None
        except WorkerDied as exc:  # the command waits for the next worker
            self._lost(worker, str(exc))
            return False
        except Exception as exc:  # noqa: BLE001 - handed to the caller (a refused classifier, with the reason)
            command.done.set_exception(exc)
        else:
            command.done.set_result(result)
        return True

    # ---- batches --------------------------------------------------------------------------------------------------
    async def features(self, tower_id: str, pixels: list[np.ndarray]) -> np.ndarray:
        """N (3, S, S) pixel arrays → (N, D) features, the images joining the batches of concurrent requests."""
        return (await self.outputs(tower_id, pixels, [tower_id]))[tower_id]

    async def outputs(self, tower_id: str, pixels: list[np.ndarray], wanted: list[str]) -> dict[str, np.ndarray]:
        """N (3, S, S) pixel arrays through the tower `tower_id` → {tower id: (N, *shape)} for each of `wanted`:
        that tower and/or towers that read its output (each run once per image, whoever else wants it)."""
        n = len(pixels)
        loop = asyncio.get_running_loop()
        with self._cond:
            if not self.up:
                raise retry_later("the tower worker is restarting; retry in a few seconds", 2)
            if closed := [t for t in [tower_id, *wanted] if t not in self.specs]:
                raise retry_later(f"tower {closed[0]} is not open (its classifier was just removed or refused)")
            ahead = len(self._rows) + self._in_batch + n
            if ahead * self._s_per_image > self.max_latency_s:
                raise retry_later(f"the model is overloaded: about {ahead * self._s_per_image:.1f} s of images are "
                                  f"queued, over FVGPT_MAX_LATENCY_MS ({self.max_latency_s * 1000:.0f} ms); retry "
                                  f"later")
            out = {t: np.empty((n, *self.specs[t].out_shape), np.float32) for t in wanted}
            pending = _Pending(loop, loop.create_future(), tower_id, out, n)
            self._rows.extend((pending, i, pixels[i]) for i in range(n))
            self._cond.notify_all()
        return await pending.future

    def _loop(self) -> None:
        self._spawn()
        while True:
            with self._cond:
                while not (self._rows or self._commands or self._dead or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    break
                dead = self._dead
                if not dead:  # commands wait for a new worker; rows are failed (below)
                    commands = list(self._commands)
                    self._commands.clear()
                    batch = [self._rows.popleft() for _ in range(min(self.max_batch, len(self._rows)))]
                    self._in_batch = len(batch)
            if dead:
                self._replace_worker(dead)
                continue
            for k, command in enumerate(commands):
                if not self._run_command(command):
                    with self._cond:
                        self._commands.extendleft(reversed(commands[k:]))
                    break
            if batch:
                self._run_batch(batch)
                with self._cond:
                    self._in_batch = 0
        self._fail_queued(retry_later("the server is stopping"), commands=True)
        if self.worker is not None:
            self.worker.kill()

    def _fail_queued(self, error: ApiError, commands: bool) -> None:
        with self._cond:
            rows, failed = list(self._rows), list(self._commands) if commands else []
            self._rows.clear()
            if commands:
                self._commands.clear()
        for pending in {id(p): p for p, _, _ in rows}.values():
            _settle(pending, None, error)
        for command in failed:
            command.done.set_exception(error)

    def _replace_worker(self, why: str) -> None:
        self._fail_queued(retry_later(f"the tower worker died ({why}); retry in a few seconds", 2), commands=False)
        if self.worker is not None:
            self.worker.kill()
        self.restarts += 1
        with self._cond:
            self._dead = None
        self._spawn()

    def _run_batch(self, batch: list[tuple[_Pending, int, np.ndarray]]) -> None:
        start, c0 = time.perf_counter(), time.thread_time()
        groups: dict[str, list[tuple[_Pending, int, np.ndarray]]] = {}
        for row in batch:
            groups.setdefault(row[0].tower_id, []).append(row)
        readers = {t: _readers(t, rows) for t, rows in groups.items()}
        worker = self.worker
        try:
            if closed := [t for t in groups if t not in self.specs] + \
                    [k for r in readers.values() for k, _ in r if k not in self.specs]:
                raise retry_later(f"tower {closed[0]} was closed; retry")
            outputs, stats = worker.run([(t, [px for _, _, px in rows], readers[t]) for t, rows in groups.items()])
        except WorkerDied as exc:
            self._lost(worker, str(exc))
            error: Exception = retry_later("the tower worker died while running this request; retry in a few "
                                           "seconds", 2)
        except ApiError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - the batch's requests fail, the pool keeps serving
            logger.error("fvgpt: a tower batch failed: %s", exc)
            error = ApiError(500, f"the tower failed on this batch ({exc}); the server log has the details")
        else:
            error = None
        wall, cpu = time.perf_counter() - start, time.thread_time() - c0
        if error is not None:
            for pending in {id(p): p for p, _, _ in batch}.values():
                _settle(pending, None, error)
            return
        n = len(batch)
        tower_wall, tower_cpu = sum(s[0] for s in stats), sum(s[1] for s in stats)
        self.metrics.add("tower", tower_wall, tower_cpu, n)
        self.metrics.add("transport", wall - tower_wall, cpu - tower_cpu if worker.in_this_thread else cpu, n)
        self.metrics.add("queue", sum(start - p.queued for p, _, _ in batch), 0.0, n)
        ran = {t: len(rows) for t, rows in groups.items()}
        ran |= {k: len(rows) if r is None else len(r) for t, rows in groups.items() for k, r in readers[t]}
        self.metrics.batch(n, ran)
        per_image = wall / n
        self._s_per_image = per_image if not self._s_per_image else (1 - EMA) * self._s_per_image + EMA * per_image
        for (tower_id, rows), out in zip(groups.items(), outputs):
            position = {k: {j: p for p, j in enumerate(r)} for k, r in readers[tower_id] if r is not None}
            for j, (pending, i, _) in enumerate(rows):
                for key, values in pending.out.items():
                    values[i] = out[key][position[key][j] if key in position else j]
                pending.remaining -= 1
                if pending.remaining == 0:
                    _settle(pending, pending.out, None)


def _readers(tower_id: str, rows: list[tuple[_Pending, int, np.ndarray]]) -> list[tuple[str, list[int] | None]]:
    """The towers the rows of one tower ask for beside it, each with the rows that ask for it (None: all of them):
    each runs once on those, whichever requests they come from."""
    asking: dict[str, list[int]] = {}
    for j, (pending, _, _) in enumerate(rows):
        for key in pending.out:
            if key != tower_id:
                asking.setdefault(key, []).append(j)
    return [(key, None if len(js) == len(rows) else js) for key, js in asking.items()]
