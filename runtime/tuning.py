"""Which tower a server runs: the tuning profile `fvgpt tune` writes next to a bundle, and `choose_tower`.

The profile (`tuning.json` in the bundle dir, docs/bundle-format.md "Tuning profile") records the host it was measured
on (host.host_facts: CPU model, family and speed flags, usable cores, GPUs, runtime library versions), images/s and
latency of every candidate runtime × precision that passed the parity gate on that host, and the choice with its
reason. It is not part of the verified files: it describes a host, not the model, and is written after export.

`choose` uses the profile only when it was measured on a host like this one and for this bundle's graphs;
`--runtime/--precision` narrow (or override) the choice, by the same rule (`select`: the fastest candidate that
outruns every more accurate one by the profile's speed margin). Without a usable profile it takes the safe default (ONNX
Runtime at the bundle's default precision, or the bundle's TensorRT engine where TensorRT runs) and says that a tune
would help. A server decides once per classifier, before it opens the tower: the choice names the tower id.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bundle import TowerRunner
from .host import host_facts
from .manifest import BundleError, Manifest
from .tensorrt import tensorrt_unusable

PROFILE = "tuning.json"
PROFILE_SCHEMA = 2  # 2: candidates' gates carry the measured logit error, the choice its rule (`select`)
SERVE_RUNTIMES = ("auto", "onnx", "openvino", "tensorrt")
# The speed-up a less accurate candidate must bring over every more accurate one to be chosen, per --prefer
SPEED_MARGIN = {"speed": 1.0, "balanced": 1.15, "accuracy": float("inf")}
ACCURACY_FACTOR = 1.5  # a measured logit error this many times smaller makes a candidate more accurate
EXACT_LOGIT_ERROR = 1e-3  # the fp32 parity tolerance of logits: a smaller error is the reference's own logits


@dataclass(frozen=True)
class Choice:
    """A tower to open: runtime × precision on a device, and why it was picked."""

    runtime: str
    precision: str
    device: str
    reason: str


def profile_path(bundle_dir: Path) -> Path:
    return Path(bundle_dir) / PROFILE


def read_profile(bundle_dir: Path) -> dict | None:
    """The profile, or None when there is none; an unreadable one is a BundleError naming the file."""
    path = profile_path(bundle_dir)
    if not path.is_file():
        return None
    try:
        profile = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); delete it or run `fvgpt tune` again") from None
    if not isinstance(profile, dict) or profile.get("schema") != PROFILE_SCHEMA:
        raise BundleError(f"{path} is not a tuning profile of schema {PROFILE_SCHEMA}; run `fvgpt tune` again")
    return profile


def write_profile(bundle_dir: Path, profile: dict) -> Path:
    path = profile_path(bundle_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile, indent=2) + "\n")
    tmp.replace(path)  # never a half-written profile
    return path


def mismatch(profile: dict, manifest: Manifest, host: dict[str, Any] | None = None) -> str | None:
    """Why the profile does not apply to this host and bundle (None: it does)."""
    here = host or host_facts()
    there = profile.get("host", {})
    for key in sorted(set(here) | set(there)):
        if here.get(key) != there.get(key):
            return f"measured on another host ({key}: {there.get(key)!r} there, {here.get(key)!r} here)"
    if profile.get("model_id") != manifest.model_id:
        return f"measured for another bundle ({profile.get('model_id')})"
    tower = manifest.towers["image"]
    for c in profile.get("candidates", []):
        if tower.find(c["runtime"], c["precision"]) is None or \
                manifest.variant_id(c["runtime"], c["precision"]) != c.get("tower_id"):
            return f"measured on other tower graphs ({c['name']} changed since)"
    return None


def logit_error(candidate: dict) -> float:
    """The candidate's measured logit error on this host (its parity gate's, export/parity.py), floored at
    EXACT_LOGIT_ERROR: below it every variant computes the reference's logits."""
    return max(candidate["gate"]["logit_error"], EXACT_LOGIT_ERROR)


def more_accurate(a: dict, b: dict) -> bool:
    return logit_error(a) * ACCURACY_FACTOR < logit_error(b)


def select(candidates: list[dict], batch: int, prefer: str = "balanced") -> tuple[dict, str]:
    """The tower to serve among measured candidates: the fastest one that is at least SPEED_MARGIN[prefer] times as
    fast as every more accurate candidate (speed: the fastest; accuracy: the fastest of the most accurate), and why.

    Each step down in accuracy must pay for itself in images/s at the deciding batch size; the candidates this
    admits form a chain from the most accurate (always admitted) to the fastest that earned its loss."""
    margin = SPEED_MARGIN[prefer]

    def rate(c: dict) -> float:
        return next(r["images_per_s"] for r in c["results"] if r["batch_size"] == batch)

    def blocker(c: dict) -> dict | None:  # a more accurate candidate that c does not outrun by the margin
        return next((d for d in sorted(candidates, key=rate, reverse=True)
                     if more_accurate(d, c) and rate(c) < margin * rate(d)), None)

    best = max((c for c in candidates if blocker(c) is None), key=rate)
    why = [f"{best['name']}: {rate(best):.1f} images/s in batches of {batch}, logit error {logit_error(best):.3g}"]
    for c in sorted(candidates, key=rate, reverse=True):
        if rate(c) > rate(best):
            d = blocker(c)
            why.append(f"{c['name']} is faster ({rate(c):.1f}) but less accurate (logit error {logit_error(c):.3g}) "
                       f"and not {margin:g}x as fast as {d['name']} ({rate(c) / rate(d):.2f}x)")
        elif more_accurate(c, best):
            why.append(f"{c['name']} is more accurate (logit error {logit_error(c):.3g}) but {best['name']} is "
                       f"{rate(best) / rate(c):.2f}x as fast (at least {margin:g}x)")
    rule = (f"--prefer {prefer}: the fastest candidate at least {margin:g}x as fast as every more accurate one (more "
            f"accurate: a logit error {ACCURACY_FACTOR:g}x smaller; errors under {EXACT_LOGIT_ERROR:g} are exact)")
    return best, "; ".join(why) + f" — {rule}"


def _preferred(profile: dict, runtime: str, precision: str | None) -> dict | None:
    """The candidate `select` picks, with the profile's own --prefer, among those measured that fit `runtime`
    (unless auto) and `precision` (unless None)."""
    batch = profile["choice"]["batch_size"]
    fits = [c for c in profile.get("candidates", [])
            if (runtime == "auto" or c["runtime"] == runtime) and precision in (None, c["precision"])
            and any(r["batch_size"] == batch for r in c.get("results", []))]
    return select(fits, batch, profile["choice"]["prefer"])[0] if fits else None


def check_request(manifest: Manifest, runtime: str, precision: str | None) -> None:
    """Fail fast, with the bundle's own words, on a --runtime/--precision this bundle cannot serve."""
    if runtime not in SERVE_RUNTIMES:
        raise BundleError(f"unknown runtime {runtime!r} ({', '.join(SERVE_RUNTIMES)})")
    tower = manifest.towers["image"]
    engines = (manifest.tensorrt or {}).get("image", {})
    if runtime == "tensorrt":
        if (precision or manifest.default_precision) not in engines:
            raise BundleError(f"--runtime tensorrt: the bundle has no {precision or manifest.default_precision} "
                              f"TensorRT engine (has: {', '.join(engines) or 'none'}); export with --tensorrt on a "
                              f"GPU host")
    elif runtime == "openvino" and precision is None:
        if not tower.precisions("openvino"):
            raise BundleError("--runtime openvino: the bundle has no OpenVINO variants (export with --openvino)")
    elif runtime != "auto" or precision is not None:
        chosen = precision or manifest.default_precision
        for role in manifest.roles():  # a bundle of several tower roles needs the variant for every one
            manifest.tower_graph(role, "onnx" if runtime == "auto" else runtime, chosen)


def choose(bundle_dir: Path, manifest: Manifest, runtime: str = "auto", precision: str | None = None,
           profile: dict | None = None, host: dict[str, Any] | None = None) -> Choice:
    """The tower to run for a server's --runtime/--precision: the profile's fastest fitting candidate when the
    profile applies here, else the safe default. `profile` defaults to the bundle's own."""
    if runtime not in SERVE_RUNTIMES:
        raise BundleError(f"unknown runtime {runtime!r} ({', '.join(SERVE_RUNTIMES)})")
    if profile is None:
        try:
            profile = read_profile(bundle_dir)
        except BundleError as exc:  # a broken profile must not stop a server: it runs the safe default instead
            profile, why_not = None, f"tuning profile unusable: {exc}"
        else:
            why_not = "no tuning profile"
    if profile is not None:
        try:
            why_not = mismatch(profile, manifest, host)
            if why_not is None:
                return _from_profile(profile, runtime, precision)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            why_not = f"tuning profile malformed ({type(exc).__name__}: {exc}); run `fvgpt tune` again"
        except _NotMeasured as exc:
            why_not = str(exc)
    hint = ("; `fvgpt tune BUNDLE` measures every runtime × precision on this host and picks the fastest that is worth "
            "its accuracy")
    chosen = precision or manifest.default_precision
    openvino = manifest.towers["image"].precisions("openvino")
    if runtime == "openvino" and precision is None and chosen not in openvino and openvino:
        chosen = openvino[0]  # the default precision has no OpenVINO variant: the first one there is
    engines = (manifest.tensorrt or {}).get("image", {})
    if runtime == "auto":
        runtime = "tensorrt" if chosen in engines and tensorrt_unusable() is None else "onnx"
    return Choice(runtime, chosen, "auto" if runtime == "onnx" else "cpu" if runtime == "openvino" else "cuda",
                  f"safe default ({why_not}{hint})")


class _NotMeasured(Exception):
    pass


def _from_profile(profile: dict, runtime: str, precision: str | None) -> Choice:
    best = _preferred(profile, runtime, precision)
    wanted = " ".join(x for x in (runtime if runtime != "auto" else None, precision) if x)
    if best is None:
        raise _NotMeasured(f"the tuning profile measured no {wanted} candidate")
    batch = profile["choice"]["batch_size"]
    which = "its choice" if best["name"] == profile["choice"]["name"] else f"its choice among {wanted} candidates"
    return Choice(best["runtime"], best["precision"], best["device"],
                  f"tuning profile of {profile.get('created', '?')}, {which}: {_rate(best, batch):.1f} images/s in "
                  f"batches of {batch}")


def _rate(candidate: dict, batch: int) -> float:
    return next(r["images_per_s"] for r in candidate["results"] if r["batch_size"] == batch)


def choose_tower(bundle_dir: Path, manifest: Manifest, runtime: str = "auto", precision: str | None = None,
                 threads: int | None = None) -> tuple[TowerRunner, Choice]:
    """Open the chosen tower."""
    choice = choose(bundle_dir, manifest, runtime, precision)
    return TowerRunner(bundle_dir, manifest, choice.precision, choice.runtime, choice.device, threads), choice
