"""The driver of `fvgpt classify`: Ray (local, or the cluster at --address / RAY_ADDRESS), the dataset of the items
still to do, the two stages (stages.py), and the shards written as their rows arrive (shards.py).

Resources: tower actors take --actor-cpus each (default 1, fractional allowed) and decode tasks DECODE_CPUS, so on a
small node the decode tasks always find a CPU next to the actors (actors holding every CPU stall the pipeline for
good: docs/batch.md, "CPUs"), and at most --decode-tasks of them run at once (default one per actor: a CPU
decodes ~400 photos/s, ten times what a CPU tower classifies; more race ahead of the towers at the start and take
their CPU, which delayed the first rows from 9 to 15 s: docs/batch.md). The first input blocks hold one tower batch,
so the first rows come back after the first batch; later ones are larger (block_sizes). The actors go one per node
(a placement group: _place_towers), by default one on each node with the CPUs for it. Ctrl-C (or SIGTERM) stops the
pipeline, shuts Ray down (a local instance with every actor and worker process; on a cluster the job's actors, which
die with their driver) and keeps the shards already written: the same command continues.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any

from fvgpt_runtime.images import PixelLimits
from fvgpt_runtime.manifest import Manifest

from fvgpt.preprocess import Preprocess

from .inputs import Items
from .progress import Counter
from .shards import SUMMARY, JobRecord, prepare, shard_name, write_atomic
from .stages import ERROR_KINDS, Model, Towers, decode_batch, pixel_bytes

ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the remote function's name in its messages
RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b[^:]*:")  # a traceback's last line
ERROR_LOG = "job-error.txt"  # in --out: the remote traceback of the failure that stopped the job
DECODE_CPUS = 0.5  # per decode task: with actors at 1 CPU each, a 2-CPU node still runs two decode tasks
DECODE_BATCH = 16  # images per decode task call
FIRST_BLOCKS_PER_ACTOR = 4  # one-batch input blocks at the start of a job (block_sizes)
BLOCK_ITEMS = 256  # items per input block after those
BLOCK_BYTES = 64 << 20  # decoded pixels per input block at most (a 224 px image is 0.6 MB of float32)
PLACEMENT_WAIT_S = 120  # for the cluster to hold the tower actors (_place_towers)


@dataclass
class Settings:
    """How the job runs (what it computes is in JobRecord)."""

    address: str | None = None
    actors: int | None = None  # default: one per node
    actor_cpus: float = 1.0
    decode_tasks: int | None = None  # decode tasks at once (default: one per actor)
    threads: int | None = None  # tower threads per actor (default: ONNX Runtime's, one per core)
    batch_size: int = 32
    limits: PixelLimits = field(default_factory=PixelLimits)
    jpeg_draft: bool = True
    max_image_bytes: int = 64 << 20
    progress: bool = True


class JobFailed(ValueError):
    """A stage of the job failed on a Ray worker (an actor that could not load its classifiers, a task that crashed):
    the CLI prints it as one line (`error: ...`) instead of Ray's remote traceback."""


def _failure(exc: Exception) -> str:
    """The remote cause of a Ray error in one line: a task's own exception, or the last line of the remote traceback
    Ray puts in its own errors' text (an actor that died in its constructor), else Ray's first line."""
    from ray.exceptions import RayError, RayTaskError

    cause: BaseException = exc
    while isinstance(cause, RayTaskError) and cause.cause is not None:
        cause = cause.cause
    lines = [ANSI.sub("", line).strip() for line in str(cause).splitlines() if line.strip()] or ["no message"]
    if isinstance(cause, RayError) and RAISED.match(lines[-1]):
        return lines[-1]
    return f"{type(cause).__name__}: {lines[0]}"


def _interrupt(signum, frame):  # SIGTERM ends the job as Ctrl-C does: shards kept, Ray shut down
    raise KeyboardInterrupt


def _start_ray(address: str | None) -> Any:
    # Ray Data's own logging off (its execution reports, and a failed stage's traceback printed as a bug in Ray when an
    # actor dies in its constructor): a failure raises, and the job reports it as one line (JobFailed); set
    # RAY_DATA_LOG_LEVEL to see Ray Data's log again
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "CRITICAL")
    # no task events: Ray's GCS keeps every task's events for the dashboard and `ray list tasks` (neither used here),
    # and grew by ~32 MB per 130,000 images in a long job (docs/batch.md); set the variable to keep them
    os.environ.setdefault("RAY_task_events_report_interval_ms", "0")
    import ray

    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts images and shards; Ray's would interleave with it
    ctx.print_on_execution_start = False
    return ray


def run(items: Items, models: list[Model], record: JobRecord, out: Path, settings: Settings) -> dict[str, Any]:
    """Classify the items not yet in a shard of `out`; a summary of this run (also written to out/summary.json)."""
    t0 = time.perf_counter()
    done = prepare(out, record)
    pending = [s for s in range(record.shards) if s not in done]
    skipped = sum(min(record.shard_size, record.items - s * record.shard_size) for s in done)
    if done:
        print(f"skipping {len(done)} shard(s) already written ({skipped} of {record.items} images)", file=sys.stderr)
    summary: dict[str, Any] = {"images": 0, "skipped": skipped, "rows": 0, "errors": dict.fromkeys(ERROR_KINDS, 0),
                               "shards_written": 0, "out": str(out)}
    if not pending:
        return _finish(summary, out, t0, None, None, 0)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    ray = None
    try:
        ray = _start_ray(settings.address)
        ds, metadata = _dataset(ray, items, models, record, pending, settings)
        t_started = time.perf_counter()
        summary |= _collect(ds, models, record, out, pending, metadata, settings, summary)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {summary['shards_written']} shard(s) written this run are kept; run the same command "
              f"to continue", file=sys.stderr)
        raise
    except Exception as exc:
        if ray is None or not isinstance(exc, ray.exceptions.RayError):
            raise
        (out / ERROR_LOG).write_text(ANSI.sub("", str(exc)) + "\n")
        raise JobFailed(f"the job stopped: {_failure(exc)} ({summary['shards_written']} shard(s) written this run "
                        f"are kept; the full error is in {out / ERROR_LOG}; fix the cause and run the same command "
                        f"to continue)") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        if ray is not None:
            ray.shutdown()
    return _finish(summary, out, t0, t_started, summary.pop("first_s", None), summary.pop("first_images", 0))


def block_sizes(items: int, actors: int, batch_size: int, image_bytes: int) -> list[int]:
    """How many items each input block holds, in order. Ray schedules a decode task per block and keeps statistics
    per block for the whole job, which grew by ~10 KB per block (0.3 KB per image with one-batch blocks: docs/batch.md,
    "Memory over a long job"): so after a first few blocks of one tower batch each (the first rows come back after one
    batch, and every actor gets one at once), blocks hold up to BLOCK_ITEMS items, fewer where their decoded pixels
    would pass BLOCK_BYTES, in whole tower batches."""
    first = min(items, FIRST_BLOCKS_PER_ACTOR * actors * batch_size)
    later = max(batch_size, min(BLOCK_ITEMS, BLOCK_BYTES // image_bytes) // batch_size * batch_size)
    sizes = [min(batch_size, first - i) for i in range(0, first, batch_size)]
    return sizes + [min(later, items - i) for i in range(first, items, later)]


def _place_towers(ray: Any, settings: Settings) -> tuple[int, Any]:
    """The number of tower actors and where they go: a placement group with one bundle of --actor-cpus per actor,
    strictly one per node while there are enough nodes with the CPUs (Ray's default spreading is best effort: it put
    both actors of a two-node job on one node when that node had the CPUs free). Raises JobFailed when the cluster
    cannot hold them within PLACEMENT_WAIT_S, at once when they would leave no CPU for decoding (the job would stall
    for good)."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    alive = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
    nodes = sum(1 for cpus in alive if cpus >= settings.actor_cpus)
    actors = settings.actors or max(nodes, 1)
    if actors * settings.actor_cpus + DECODE_CPUS > sum(alive):
        raise JobFailed(f"{actors} tower actor(s) of {settings.actor_cpus} CPU each leave no CPU for decoding on "
                        f"{'this machine' if len(alive) == 1 else 'the cluster'} ({sum(alive):g} CPU(s); a decode "
                        f"task takes {DECODE_CPUS}): use fewer --actors or a smaller --actor-cpus")
    strategy = "STRICT_SPREAD" if actors <= nodes else "SPREAD"
    group = placement_group([{"CPU": settings.actor_cpus}] * actors, strategy=strategy)
    if not group.wait(timeout_seconds=PLACEMENT_WAIT_S):
        remove_placement_group(group)
        raise JobFailed(f"the cluster could not place {actors} tower actor(s) of {settings.actor_cpus} CPU each "
                        f"({'one per node' if strategy == 'STRICT_SPREAD' else 'spread over the nodes'}) within "
                        f"{PLACEMENT_WAIT_S} s: {nodes} node(s) have that many CPUs; use fewer --actors or a smaller "
                        f"--actor-cpus, or free CPUs on the cluster")
    return actors, PlacementGroupSchedulingStrategy(group)


def _dataset(ray: Any, items: Items, models: list[Model], record: JobRecord, pending: list[int],
             settings: Settings) -> tuple[Any, dict]:
    import pyarrow as pa

    size = record.shard_size
    todo = [i for s in pending for i in range(s * size, min((s + 1) * size, record.items))]
    cfgs: list[Preprocess] = []
    for m in models:
        cfg = Manifest.read(m.path).preprocess
        if cfg not in cfgs:
            cfgs.append(cfg)
    actors, placement = _place_towers(ray, settings)
    decode_tasks = settings.decode_tasks or actors
    ends = list(accumulate(block_sizes(len(todo), actors, settings.batch_size, pixel_bytes(cfgs))))
    blocks = [pa.table({"index": pa.array(part, pa.int64()), "path": [items.paths[i] for i in part],
                        "table": [items.tables[i] for i in part],
                        "row": pa.array([items.rows[i] for i in part], pa.int64())})
              for part in (todo[a:b] for a, b in zip([0, *ends], ends))]
    ds = ray.data.from_blocks(blocks)  # metadata read here (from_arrow runs a task per block for it)
    ds = ds.map_batches(decode_batch, batch_size=DECODE_BATCH, batch_format="numpy", num_cpus=DECODE_CPUS,
                        concurrency=decode_tasks,
                        fn_kwargs={"cfgs": cfgs, "limits": settings.limits, "jpeg_draft": settings.jpeg_draft,
                                   "max_bytes": settings.max_image_bytes, "column": items.column})
    with warnings.catch_warnings():  # max_restarts: Ray names the keyword deprecated, and offers no other way
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ds.map_batches(Towers, batch_size=settings.batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=settings.actor_cpus,
                            fn_constructor_kwargs={"models": models, "cfgs": cfgs, "batch_size": settings.batch_size,
                                                   "threads": settings.threads,
                                                   "all_probabilities": record.all_probabilities},
                            scheduling_strategy=placement,
                            max_restarts=0)  # a crashed actor fails the job (shards kept); a restart could not
        # find its constructor arguments again (ray#53727)
    metadata = {"job": asdict(record), "models": [asdict(m) for m in models], "batch_size": settings.batch_size,
                "actors": actors, "decode_tasks": decode_tasks, "jpeg_draft": settings.jpeg_draft,
                "note": "int8 towers quantise activations per batch: their probabilities depend on batch_size"}
    return ds, metadata


def _collect(ds: Any, models: list[Model], record: JobRecord, out: Path, pending: list[int], metadata: dict,
             settings: Settings, summary: dict) -> dict:
    """Rows as they arrive → a shard written as soon as all its rows are there."""
    import pyarrow as pa

    size, per_image = record.shard_size, len(models)
    expected = {s: per_image * (min((s + 1) * size, record.items) - s * size) for s in pending}
    parts: dict[int, list] = defaultdict(list)
    counts: dict[int, int] = defaultdict(int)
    total = sum(expected.values()) // per_image
    first_s, first_images = None, 0
    with Counter(total, "classify", "img", settings.progress) as progress:
        t0 = time.perf_counter()
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if first_s is None:
                first_s, first_images = time.perf_counter() - t0, table.num_rows // per_image
            shard_of = pa.compute.divide(table.column("index"), size).to_numpy()
            for s in set(shard_of.tolist()):
                part = table.filter(pa.array(shard_of == s))
                parts[s].append(part)
                counts[s] += part.num_rows
                if counts[s] == expected[s]:
                    whole = pa.concat_tables(parts.pop(s)).sort_by([("index", "ascending"), ("model", "ascending"),
                                                                     ("version", "ascending")])
                    write_atomic(whole, out / shard_name(s, record.format), record.format, metadata)
                    summary["shards_written"] += 1
            kinds = table.column("error_kind").to_pylist()
            summary["rows"] += table.num_rows
            for kind in kinds:
                if kind:
                    summary["errors"][kind] += 1
            summary["images"] += table.num_rows // per_image
            progress.update(table.num_rows // per_image, shards=summary["shards_written"])
    summary["errors"] = {k: v // per_image for k, v in summary["errors"].items()}
    return {"first_s": first_s, "first_images": first_images}


def _finish(summary: dict, out: Path, t0: float, t_started: float | None, first_s: float | None,
            first_images: int) -> dict:
    """Wall time split into start-up (Ray, the actors loading, the first rows back) and the steady rate after it."""
    wall = time.perf_counter() - t0
    summary["wall_s"] = round(wall, 3)
    if t_started is not None and first_s is not None:
        startup = t_started - t0 + first_s
        summary["startup_s"] = round(startup, 3)
        steady = wall - startup
        summary["images_per_s_steady"] = round((summary["images"] - first_images) / steady, 3) if steady > 0 else None
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    (out / ERROR_LOG).unlink(missing_ok=True)  # a failure of an earlier run, now resolved
    return summary
