"""Where a served request's CPU goes: `fvgpt serve` under load, sampled with py-spy, each sample counted to a stage.

    python -m benchmarks.cpu_breakdown --bundle BUNDLE [--checkout DIR --python PY] [--concurrency 8] [--seconds 20]

Starts `fvgpt serve BUNDLE` on a free loopback port (from --checkout with its --python: another version of this
repository, e.g. the code before the serving engine, measured on the same bundle and machine), sends one-photo
multipart requests from --concurrency client threads (benchmarks/http_load's client) for --seconds, measuring the CPU
seconds of every process (psutil), then loads it as long again while py-spy samples every Python thread of every
process of the server (`py-spy record --subprocesses --idle --format raw`, 100 Hz). A sample whose innermost frame
is a wait (a thread pool's queue, a condition, the event loop's select, a pipe read) is idle and dropped; any other is
counted to the stage of its innermost frame that names one (STAGES, in order: the first match wins). The CPU seconds
each process used in the first, unsampled load are split: in the API process by the stages' shares of its busy
samples; in the process running the towers (the tower worker, or the old encoder worker), whose runtime threads are
native and never sampled, every stage but "tower" gets its samples × the sampling period and "tower" the rest. Each
figure is divided by the images the first load answered (py-spy pauses the server for each sample, so the second
load's CPU is not the server's own). py-spy needs ptrace rights over the server (root, or the same user with
ptrace_scope 0).

Also: the CPU ms per image of all the server's processes together and of the client, and of the tower + heads alone
(the tower `fvgpt serve` runs here, timed in this process after the load with process_time, every runtime thread
counted). Their ratio, `cpu_efficiency` = tower + heads ÷ (server + client), is the share of the CPU that goes into
the model: on a machine the run has to itself it bounds the HTTP images/s ÷ model-only images/s that http_load
measures, and unlike that ratio it holds up when other work shares the machine.

Writes cpu_breakdown.json (settings, per process: CPU seconds, samples, per stage share and ms per image; the CPU per
image of server, client and model; cpu_efficiency) and cpu_breakdown.csv (one row per process and stage).
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

if not __package__:  # `python benchmarks/cpu_breakdown.py`: make the repo importable like `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (BenchError, command_line, library_versions, load_average, machine_info, photo_bytes,
                               run_and_write, utc_now)

# (stage, pattern on a frame "function (file:line)"); the innermost frame matching one decides, the first pattern that
# matches it names the stage
STAGES = [
    ("tower", r"TowerRunner|openvino|tensorrt|\bencode \(.*service\.py|tower_worker\.py"),
    ("decode", r"PIL/ImageFile|PIL/JpegImagePlugin|PIL/PngImagePlugin|\bload \(.*images\.py|decode_slice"),
    ("preprocess", r"preprocess\.py"),
    ("heads", r"\bscores \(.*bundle\.py|label_features|encode_text"),
    ("transport", r"aiohttp|_bentoml_impl/client|serde\.py|towers\.py|multiprocessing/connection|encoder_link|"
                  r"marshal/dispatcher|AutoContainer|numpy_prepare|TensorSchema"),
    ("serialise", r"json/encoder|model_dump_json|responses\.py.*render|JSONResponse"),
    ("the server's routing and answers", r"model_construct"),  # the engine building its answer models
    ("multipart/JSON parse", r"python_multipart|formparsers|engine/parse\.py|engine/models\.py|request\.py|"
                             r"pydantic|json/decoder|base64"),
    ("HTTP parsing (uvicorn, h11)", r"h11|uvicorn/protocols|protocol\.py"),
    ("the server's routing and answers", r"serving/engine/|serving/shell/|serving/app\.py|serving/service\.py|"
                                          r"serving/repository\.py|ranking\.py|label_sets\.py"),
    ("BentoML and ASGI middleware", r"bentoml|opentelemetry|prometheus|starlette|_bentoml_sdk|errors\.py|"
                                    r"contextvars|anyio"),
    ("event loop, sockets, thread wake-ups", r"asyncio|selectors|socket\.py"),
    ("logging", r"logging"),
]
OTHER = "other Python"
IDLE = re.compile(r"_worker \(concurrent/futures/thread\.py|\bwait \(threading\.py|\bget \(queue\.py|"
                  r"\bselect \(selectors\.py|_recv \(multiprocessing/connection\.py|_poll \(multiprocessing|"
                  r"_try_wait \(subprocess\.py|_wait_for_tstate_lock|\bsleep \(")  # an innermost frame that waits
PERIOD_S = 0.01  # 100 Hz
ROOT = re.compile(r"^process (\d+):")


def stage_of(frames: list[str]) -> str | None:
    """The stage a sample counts to; None for an idle one."""
    if not frames or IDLE.search(frames[-1]):
        return None
    for frame in reversed(frames):
        for stage, pattern in STAGES:
            if re.search(pattern, frame):
                return stage
    return OTHER


def parse_raw(text: str) -> dict[int, Counter]:
    """py-spy's raw output ("frame;frame;... count" per line; with --subprocesses the stack starts with the chain of
    processes, "process PID:cmdline", down to the sampled one) → samples per stage, per process id."""
    out: dict[int, Counter] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        roots = [i for i, f in enumerate(frames) if ROOT.match(f)]  # the process tree, outermost first
        pid = int(ROOT.match(frames[roots[-1]]).group(1)) if roots else 0
        if (stage := stage_of(frames[roots[-1] + 1 if roots else 0:])) is not None:
            out.setdefault(pid, Counter())[stage] += int(count)
    return out


def role_of(cmdline: list[str]) -> str:
    cmd = " ".join(cmdline)
    if "tower_worker" in cmd or "fvgpt-encoder" in cmd:
        return "tower"
    if "_bentoml_impl.worker.service" in cmd:
        return "api"
    return "arbiter"


def cpu_seconds(procs) -> dict[int, float]:
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except Exception:  # noqa: BLE001 - a process that went away counts nothing
            pass
    return out


def run(args) -> dict:
    import psutil

    from benchmarks.http_load import Tally, Target, client, multipart, parse_target

    if not (Path(args.bundle) / "manifest.json").is_file():
        raise BenchError(f"{args.bundle} is not a bundle (no manifest.json)")
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.is_file():
        raise BenchError("py-spy is not installed in this environment: pip install '.[bench]'")
    from fvgpt_serving.process import free_port, stop, wait_ready

    load_start = load_average()
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="fvgpt-cpu-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FVGPT_")} | {
        "BENTOML_HOME": str(work / "home"), "BENTOML_DO_NOT_TRACK": "True"} | dict(args.set)
    cmd = [args.python, "-m", "fvgpt.cli", "serve", str(Path(args.bundle).resolve()), "--port", str(port)]
    with open(work / "server.log", "w") as log:
        server = subprocess.Popen(cmd, cwd=args.checkout, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_ready(server, f"http://127.0.0.1:{port}", 300)
        target: Target = parse_target(f"http://127.0.0.1:{port}")
        photos = photo_bytes()
        bodies = [multipart(photos, i, 1) for i in range(len(photos))]
        warm = threading.Thread(target=client, args=(target, bodies, itertools.count(), 16, time.perf_counter() + 120,
                                                     60, Tally()))
        warm.start()
        warm.join()
        procs = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
        roles = {p.pid: role_of(p.cmdline()) for p in procs}
        me = psutil.Process()

        def load(seconds: float, spy_on: bool) -> tuple[int, int, dict[int, float], float, subprocess.CompletedProcess]:
            """Load for `seconds` (py-spy sampling it, or not): images, errors, CPU s per process, client CPU s."""
            tallies = [Tally() for _ in range(args.concurrency)]
            counter, deadline = itertools.count(), time.perf_counter() + seconds
            threads = [threading.Thread(target=client, args=(target, bodies, counter, 10**9, deadline, 60, t))
                       for t in tallies]
            before, client_before = cpu_seconds(procs), sum(me.cpu_times()[:2])
            for t in threads:
                t.start()
            spied = None
            if spy_on:
                time.sleep(1)
                spied = subprocess.run([str(spy), "record", "--pid", str(server.pid), "--subprocesses", "--idle",
                                        "--format", "raw", "--rate", str(round(1 / PERIOD_S)), "--duration",
                                        str(round(seconds - 2)), "--output", str(raw)],
                                       capture_output=True, text=True, timeout=seconds + 120, check=False)
            for t in threads:
                t.join()
            after = cpu_seconds(procs)
            used = {pid: after[pid] - before.get(pid, 0.0) for pid in after}
            return (sum(len(t.latencies) for t in tallies), sum(sum(t.errors.values()) for t in tallies), used,
                    sum(me.cpu_times()[:2]) - client_before, spied)

        raw = work / "spy.txt"
        images, errors, used, client_cpu, _ = load(args.seconds, spy_on=False)  # CPU per image, undisturbed
        _, _, _, _, spied = load(args.seconds, spy_on=True)  # where it goes: py-spy's samples
        if spied.returncode != 0 or not raw.is_file():
            raise BenchError(f"py-spy failed ({spied.returncode}): {spied.stderr.strip()[-500:]}")
        samples = parse_raw(raw.read_text())
    finally:
        stop(server)
    server_cpu = sum(used.values())
    model_cpu = model_only_cpu_ms(args.bundle, args.model_batch, args.model_iters)
    processes, rows = [], []
    for pid, counts in sorted(samples.items()):
        role = roles.get(pid, "unknown")
        cpu = used.get(pid, 0.0)  # over the undisturbed load: split below by the sampled load's shares
        total = sum(counts.values())
        if role == "tower":  # native runtime threads are not sampled: the tower gets what the sampled rest leaves
            seconds = {stage: min(n * PERIOD_S, cpu) for stage, n in counts.items() if stage != "tower"}
            seconds["tower"] = max(0.0, cpu - sum(seconds.values()))
        else:
            seconds = {stage: cpu * n / total for stage, n in counts.items()}
        stages = {stage: {"samples": counts[stage], "share": sec / cpu if cpu else 0.0,
                          "cpu_ms_per_image": 1e3 * sec / images if images else None}
                  for stage, sec in sorted(seconds.items(), key=lambda kv: -kv[1])}
        processes.append({"pid": pid, "role": role, "cpu_s": cpu, "samples": total, "stages": stages})
        rows += [{"role": role, "pid": pid, "stage": stage, "samples": s["samples"], "share": round(s["share"], 4),
                  "cpu_ms_per_image": round(s["cpu_ms_per_image"], 3) if s["cpu_ms_per_image"] else None}
                 for stage, s in stages.items()]
    return {"benchmark": "cpu_breakdown", "created": utc_now(), "command": command_line(), "machine": machine_info(),
            "load_average": {"start": load_start, "end": load_average()}, "versions": library_versions(),
            "settings": {"bundle": str(Path(args.bundle).resolve()), "checkout": str(Path(args.checkout).resolve()),
                         "server_settings": dict(args.set),
                         "concurrency": args.concurrency, "seconds": args.seconds, "sampler": "py-spy raw, 100 Hz"},
            "images": images, "errors": errors, "images_per_s": images / args.seconds,
            "cpu_ms_per_image": {"server": 1e3 * server_cpu / images if images else None,
                                 "client": 1e3 * client_cpu / images if images else None,
                                 "model_only": model_cpu},
            "cpu_efficiency": model_cpu * images / (1e3 * (server_cpu + client_cpu)) if images else None,
            "processes": processes, "rows": rows}


def model_only_cpu_ms(bundle_dir: str, batch: int, iters: int) -> float:
    """CPU ms per image of the tower + heads alone, the tower `fvgpt serve` runs here (http_load's reference),
    measured in this process (process_time: every runtime thread)."""
    from fvgpt_runtime.bundle import Bundle
    from fvgpt_runtime.tuning import choose_tower

    from benchmarks.common import decode_batch

    bundle = Bundle(bundle_dir)
    tower, _ = choose_tower(bundle.path, bundle.manifest)
    pixels = decode_batch(photo_bytes(), batch, bundle.preprocess)
    for _ in range(2):
        bundle.scores(tower(pixels))
    c0 = time.process_time()
    for _ in range(iters):
        bundle.scores(tower(pixels))
    return 1e3 * (time.process_time() - c0) / (batch * iters)


def setting(text: str) -> tuple[str, str]:
    name, eq, value = text.partition("=")
    if not eq or not name.startswith("FVGPT_"):
        raise argparse.ArgumentTypeError(f"expected FVGPT_NAME=VALUE, got {text!r}")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_breakdown", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="bundle to serve")
    p.add_argument("--checkout", default=str(Path(__file__).resolve().parents[1]),
                   help="repository checkout whose `fvgpt serve` runs (default: this one)")
    p.add_argument("--python", default=sys.executable, help="its interpreter (default: this one)")
    p.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    p.add_argument("--seconds", type=int, default=20, help="seconds sampled (default 20)")
    p.add_argument("--set", action="append", default=[], metavar="FVGPT_VAR=VALUE", type=setting,
                   help="a server setting (repeatable), e.g. FVGPT_TOWER_WORKER=thread")
    p.add_argument("--model-batch", type=int, default=8, help="batch of the model-only CPU reference (default 8)")
    p.add_argument("--model-iters", type=int, default=10, help="timed batches of the model-only reference (default 10)")
    p.add_argument("--out", default="runs/benchmarks", help="folder for cpu_breakdown.json and .csv")
    return p


def main(argv: list[str] | None = None) -> int:
    if (written := run_and_write(run, build_parser().parse_args(argv), "cpu_breakdown", "rows")) is None:
        return 2
    report, json_path, csv_path = written
    for proc in report["processes"]:
        print(f"{proc['role']} (pid {proc['pid']}): {proc['cpu_s']:.1f} CPU s, {proc['samples']} samples")
        for stage, s in proc["stages"].items():
            ms = "—" if s["cpu_ms_per_image"] is None else f"{s['cpu_ms_per_image']:.2f} ms/image"
            print(f"  {stage:32s} {100 * s['share']:5.1f} %  {ms}")
    c = report["cpu_ms_per_image"]
    print(f"CPU ms per image: server {c['server']:.1f}, client {c['client']:.1f}, tower + heads alone "
          f"{c['model_only']:.1f}: CPU efficiency {report['cpu_efficiency']:.2f}")
    print(f"{report['images']} images, {report['errors']} errors; wrote {json_path}, {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
