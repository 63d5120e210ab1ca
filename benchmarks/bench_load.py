"""Many annotators on one server, with and without a training round, scheduled vs serial; kills; nothing lost.

    .venv/bin/python benchmarks/bench_load.py [--annotators 8] [--seconds 120] [--think 1.0]
                                              [--modes scheduled,serial] [--adjacent-slices 6]
                                              [--training-seconds 0] [--publish-kills 40]
                                              [--train-kills 3] [--out results.json]

Against the real server (``lib.server:app`` on loopback, the shipped sample data, a fresh copy of
the app and data per server so training writes nowhere in the repository). Every phase runs once per
mode, one server after the other, in the same run: ``scheduled`` (the product: inference in scheduler
threads, prefetch) and ``serial`` (``--conf scheduler false``: MONAI Label's own endpoint, inference
inside the event loop).

1. ``--annotators`` simulated annotators for ``--seconds``: each picks an image and slice, places a
   box or a first click, refines with two more clicks (per-client state, decoder only: "further
   clicks"), moves to the adjacent slice and does it again (``next_slice``), thinking ``--think``
   seconds between requests; every third session submits the mask as a final label. A poller reads
   ``GET /info`` every second as the clients do. Requests, errors, p50/p95 per kind, the server's
   resident memory (process tree, sampled every 0.5 s) before, at peak and after.
2. The same while a training round runs (started at the beginning; the phase lasts until the round is
   over, or ``--training-seconds`` when given, after which the round is stopped): which adapter
   versions answered, and whether any answer went back to an older one.
3. One annotator alone (``--adjacent-slices`` times): a box on slice k, two further clicks, 1.5 s of
   thinking, then a prompt on slice k+1; the first prompt on the adjacent slice against a cached click.
4. (scheduled only) kill points: a process that only publishes adapters, SIGKILLed ``--publish-kills``
   times at random moments; the server's real training subprocess SIGKILLed mid-round
   ``--train-kills`` times. Every time, the listed versions must all load and the server must answer.
5. (scheduled only, unless ``--no-label-check``) the server is SIGKILLed and restarted on the same
   folders: every label accepted under load must be there byte for byte (latest per image), earlier
   ones in the label history.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "medsam_adapter"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(APP))
from kill_points import kill_publisher  # noqa: E402
from live_server import Server  # noqa: E402

from lib.core.eval_backends import decode_infer_answer  # noqa: E402

IMAGES = sorted(p.name[: -len(".nii.gz")] for p in (ROOT / "sample-data").glob("*.nii.gz"))


def tree_rss(pid: int) -> int:
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)] if p.is_running())
    except psutil.Error:
        return 0


class Recorder:
    """Latencies and errors per request kind, versions seen, labels accepted (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.versions: list[str] = []
        self.labels: dict[str, list[str]] = defaultdict(list)  # image -> sha256 of accepted submissions

    def add(self, kind: str, ms: float, version: str | None = None) -> None:
        with self.lock:
            self.latency[kind].append(ms)
            if version:
                self.versions.append(version)

    def summary(self) -> dict:
        kinds = {}
        for kind, values in sorted(self.latency.items()):
            values = sorted(values)
            kinds[kind] = {
                "n": len(values),
                "p50_ms": round(statistics.median(values), 1),
                "p95_ms": round(values[min(len(values) - 1, int(0.95 * len(values)))], 1),
            }
        return {
            "requests": sum(len(v) for v in self.latency.values()),
            "errors": len(self.errors),
            "error_examples": self.errors[:5],
            "by_kind": kinds,
        }


def post_infer(url: str, image: str, body: dict, session: requests.Session) -> tuple[float, dict, bytes]:
    """(wall ms, answer params + the scheduler's Server-Timing header, label bytes) of one 2D request."""
    start = time.perf_counter()
    r = session.post(
        f"{url}/infer/medsam_2d", params={"image": image}, files={"params": (None, json.dumps(body))}, timeout=600
    )
    ms = (time.perf_counter() - start) * 1e3
    if r.status_code != 200:
        raise RuntimeError(f"{r.status_code} {r.text[:200]}")
    params, mask = decode_infer_answer(r)
    params["server_timing"] = r.headers.get("Server-Timing", "")
    return ms, params, mask


def annotator(
    url: str, n: int, stop: threading.Event, rec: Recorder, shapes: dict[str, tuple], think: float = 0.0
) -> None:
    rng = random.Random(n)
    session = 0
    http = requests.Session()
    while not stop.is_set():
        image = IMAGES[(n + session) % len(IMAGES)]
        sx, sy, sz = shapes[image]
        k0 = rng.randrange(max(sz - 1, 1))
        cx, cy = sx // 2 + rng.randint(-sx // 8, sx // 8), sy // 2 + rng.randint(-sy // 8, sy // 8)
        client = f"annotator-{n}"
        mask = None
        for k in (k0, k0 + 1):  # a slice, then the adjacent one
            box = [cx - sx // 6, cx + sx // 6, cy - sy // 6, cy + sy // 6, k, k]
            if k != k0:
                opening = ("next_slice", {"roi": box})
            else:
                opening = ("box", {"roi": box}) if session % 2 else ("first_click", {"foreground": [[cx, cy, k]]})
            steps = [
                opening,
                ("refine_click", {"foreground": [[cx, cy, k], [cx + 2, cy + 3, k]]}),
                ("refine_click", {"foreground": [[cx, cy, k], [cx + 2, cy + 3, k]], "background": [[1, 1, k]]}),
            ]
            for kind, params in steps:
                if stop.wait(think):
                    break
                body = {"client_id": client, "slice": k, "label": "organ", "reset_state": kind != "refine_click"}
                try:
                    ms, answer, mask = post_infer(url, image, {**body, **params}, http)
                    rec.add(kind, ms, answer.get("model_version"))
                    if kind == "refine_click" and not answer.get("embedding_cached"):
                        rec.add("refine_click_uncached", ms)
                except Exception as e:  # noqa: BLE001 - every failure is counted
                    with rec.lock:
                        rec.errors.append(f"{kind}: {e}")
                    mask = None
                    break
            if mask is None or stop.is_set():
                break
        if mask is not None and session % 3 == 2:
            start = time.perf_counter()
            try:
                r = http.put(
                    f"{url}/datastore/label",
                    params={"image": image},
                    files={
                        "label": ("label.nrrd", mask),
                        "params": (None, json.dumps({"label_info": [{"name": "organ", "idx": 1}]})),
                    },
                    timeout=600,
                )
                if r.status_code != 200:
                    raise RuntimeError(f"save_label {r.status_code} {r.text[:200]}")
                rec.add("save_label", (time.perf_counter() - start) * 1e3)
                with rec.lock:
                    rec.labels[image].append(hashlib.sha256(mask).hexdigest())
            except Exception as e:  # noqa: BLE001
                with rec.lock:
                    rec.errors.append(f"save_label: {e}")
        session += 1


def info_poller(url: str, stop: threading.Event, rec: Recorder, period: float = 1.0) -> None:
    """GET /info every ``period`` seconds, as the clients poll it for training status."""
    http = requests.Session()
    while not stop.wait(period):
        start = time.perf_counter()
        try:
            r = http.get(f"{url}/info/", timeout=600)
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code} {r.text[:200]}")
            rec.add("info", (time.perf_counter() - start) * 1e3)
        except Exception as e:  # noqa: BLE001
            with rec.lock:
                rec.errors.append(f"info: {e}")


def load_phase(
    server: Server,
    annotators: int,
    seconds: float,
    shapes: dict,
    train: dict | None,
    think: float = 0.0,
    training_seconds: float = 0.0,
) -> tuple[dict, Recorder]:
    rec = Recorder()
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(tree_rss(server.proc.pid))
            time.sleep(0.5)

    rss_before = tree_rss(server.proc.pid)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if train is not None:
        r = requests.post(f"{server.url}/train/medsam", json=train, timeout=60)
        r.raise_for_status()
    clicking = threading.Event()
    threads = [
        threading.Thread(target=annotator, args=(server.url, n, clicking, rec, shapes, think))
        for n in range(annotators)
    ]
    threads.append(threading.Thread(target=info_poller, args=(server.url, clicking, rec)))
    start = time.time()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stopped_round = False
    if train is not None and training_seconds > 0:
        time.sleep(max(0.0, training_seconds - seconds))
        stopped_round = training_running(server.url)
        if stopped_round:
            requests.delete(f"{server.url}/train/", timeout=600)
    elif train is not None:  # keep clicking until the round is over and its adapters have answered a while
        cap = time.time() + 1800
        while time.time() < cap and training_running(server.url):
            time.sleep(2)
        time.sleep(20)
    clicking.set()
    for t in threads:
        t.join()
    wall = time.time() - start
    stop.set()
    sampler.join()
    out = rec.summary()
    out.update(
        wall_s=round(wall, 1),
        throughput_per_s=round(out["requests"] / wall, 2),
        rss_mb={
            "before": round(rss_before / 2**20),
            "peak": round(max(samples, default=0) / 2**20),
            "after": round(tree_rss(server.proc.pid) / 2**20),
        },
        versions_seen=sorted(set(rec.versions)),
        version_went_back=went_back(rec.versions),
    )
    if train is not None:
        out["training_round_stopped_early"] = stopped_round
    return out, rec


def training_running(url: str) -> bool:
    return requests.get(f"{url}/train/", params={"check_if_running": True}, timeout=600).status_code == 200


def adjacent_slice(server: Server, shapes: dict, repeats: int, think: float = 1.5) -> dict:
    """One annotator alone: a box on slice k, two further clicks, ``think`` seconds, a box on k+1.
    Each repeat on another image (or 6 slices further), the first one a warm-up that is not counted."""
    http = requests.Session()
    cached, nxt, hits = [], [], 0
    for n in range(repeats + 1):
        image = IMAGES[n % len(IMAGES)]
        sx, sy, sz = shapes[image]
        k = min(sz // 3 + 6 * (n // len(IMAGES)), sz - 2)
        cx, cy = sx // 2, sy // 2
        roi = [cx - sx // 6, cx + sx // 6, cy - sy // 6, cy + sy // 6]
        body = {"client_id": "alone", "label": "organ", "slice": k}
        post_infer(server.url, image, {**body, "roi": [*roi, k, k], "reset_state": True}, http)
        clicks_ms = []
        for clicks in ([[cx, cy, k]], [[cx, cy, k], [cx + 2, cy + 3, k]]):
            ms, answer, _ = post_infer(server.url, image, {**body, "roi": [*roi, k, k], "foreground": clicks}, http)
            clicks_ms.append(ms)
        time.sleep(think)
        body["slice"] = k + 1
        ms, answer, _ = post_infer(server.url, image, {**body, "roi": [*roi, k + 1, k + 1], "reset_state": True}, http)
        print(
            f"  {'warm-up ' if n == 0 else ''}{image} slice {k} -> {k + 1}: {ms:.0f} ms, "
            f"cached={answer.get('embedding_cached')}, clicks {[round(c) for c in clicks_ms]} ms, "
            f"{answer['server_timing']}",
            flush=True,
        )
        if n == 0:
            continue
        cached.extend(clicks_ms)
        nxt.append(ms)
        hits += bool(answer.get("embedding_cached"))
    click_ms, next_ms = statistics.median(cached), statistics.median(nxt)
    return {
        "think_s": think,
        "cached_click_median_ms": round(click_ms, 1),
        "adjacent_slice_median_ms": round(next_ms, 1),
        "adjacent_over_cached_click": round(next_ms / click_ms, 2),
        "adjacent_slice_embedding_was_cached": f"{hits}/{repeats}",
    }


def went_back(versions: list[str]) -> bool:
    """True when an answer came from an older adapter version after a newer one had answered."""
    rank = {"base": -2, "shipped": -1}
    order = [rank.get(v, int(v[1:]) if v.startswith("v") and v[1:].isdigit() else -3) for v in versions]
    return any(b < a for a, b in zip(order, order[1:], strict=False))


def publish_kills(count: int, folder: Path) -> dict:
    report = kill_publisher(folder, "lite_medsam", count, max_delay=1.0)
    return {
        "kill_points": report.kills,
        "during_a_write": report.during_a_write,
        "versions_written": len(report.versions or []),
        "broken_listed_files": report.broken,
    }


def train_kills(server: Server, count: int) -> dict:
    rng = random.Random(1)
    killed = answered = 0
    for _ in range(count):
        requests.post(f"{server.url}/train/medsam", json={"max_epochs": 2, "publish": "always"}, timeout=60)
        deadline = time.time() + 120
        trainer = None
        while time.time() < deadline and trainer is None:
            for p in psutil.Process(server.proc.pid).children(recursive=True):
                if "-m train" in " ".join(p.cmdline()):
                    trainer = p
            time.sleep(0.2)
        if trainer is None:
            continue
        time.sleep(rng.uniform(2.0, 30.0))
        try:
            trainer.send_signal(signal.SIGKILL)
            killed += 1
        except psutil.Error:
            pass
        time.sleep(3)
        r = requests.post(
            f"{server.url}/infer/medsam_2d",
            params={"image": "spleen_ct", "output": "json"},
            files={"params": (None, json.dumps({"foreground": [[60, 50, 12]], "reset_state": True}))},
            timeout=300,
        )
        answered += r.status_code == 200
    adapters = server.app_dir / "model" / "lite_medsam" / "adapters"
    return {
        "kills": killed,
        "server_answered_after": answered,
        "partial_files_listed": len(list(adapters.glob("adapter_v*.pt.*"))),
    }


def label_check(server: Server, rec: Recorder, work: Path) -> dict:
    """SIGKILL the server, restart it on the same folders, compare every accepted label."""
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    server.stop()
    restarted = Server(server.studies, server.app_dir, work / "restarted.log")
    lost = 0
    try:
        for image, hashes in rec.labels.items():
            r = requests.get(f"{restarted.url}/datastore/label", params={"label": image, "tag": "final"}, timeout=60)
            kept = {hashlib.sha256(r.content).hexdigest()} if r.status_code == 200 else set()
            history = server.studies / ".label_history" / "final" / image
            if history.is_dir():
                kept |= {hashlib.sha256(p.read_bytes()).hexdigest() for p in history.iterdir()}
            lost += len(set(hashes) - kept)  # accepted, yet neither served nor in the history
    finally:
        restarted.stop()
    return {
        "labels_submitted": sum(len(h) for h in rec.labels.values()),
        "images_labelled": len(rec.labels),
        "lost": lost,
    }


MODES = {"scheduled": {}, "serial": {"scheduler": "false"}}
TARGETS = (  # issue 17's "must show" for 8 annotators on the 2-core machine
    ("inference_only", "refine_click", "p50_ms", 150),
    ("inference_only", "refine_click", "p95_ms", 500),
    ("inference_only", "info", "p95_ms", 100),
    ("with_training", "refine_click", "p50_ms", 150),
    ("with_training", "refine_click", "p95_ms", 500),
    ("with_training", "info", "p95_ms", 100),
)


def fresh_copy(work: Path, name: str) -> tuple[Path, Path]:
    """A fresh app (no published adapters) and datastore (no labels) for one server."""
    app_dir, studies = work / name / "app", work / name / "studies"
    shutil.copytree(APP, app_dir, ignore=shutil.ignore_patterns("model", "__pycache__", "logs"))
    studies.mkdir(parents=True)
    for image in IMAGES:
        shutil.copy(ROOT / "sample-data" / f"{image}.nii.gz", studies)
    return app_dir, studies


def side_by_side(report: dict, modes: list[str]) -> str:
    """A plain-text table: p50/p95 per request kind and phase, one column pair per mode."""
    modes = [m for m in modes if "failed" not in report[m]]
    rows = [f"{'phase':<16}{'request':<22}" + "".join(f"{m + ' p50/p95 ms':>28}" for m in modes)]
    phases = ("inference_only", "with_training")
    for phase in phases:
        kinds = sorted({k for m in modes for k in report[m].get(phase, {}).get("by_kind", {})})
        for kind in kinds:
            cells = []
            for m in modes:
                v = report[m].get(phase, {}).get("by_kind", {}).get(kind)
                cells.append(f"{v['p50_ms']:.0f} / {v['p95_ms']:.0f} (n={v['n']})" if v else "-")
            rows.append(f"{phase:<16}{kind:<22}" + "".join(f"{c:>28}" for c in cells))
    for label, key in (("errors", "errors"), ("peak RSS MB", "rss_mb")):
        for phase in phases:
            cells = []
            for m in modes:
                v = report[m].get(phase, {}).get(key)
                cells.append(str(v["peak"] if isinstance(v, dict) else v) if v is not None else "-")
            rows.append(f"{phase:<16}{label:<22}" + "".join(f"{c:>28}" for c in cells))
    cells = []
    for m in modes:
        adj = report[m].get("adjacent_slice")
        cells.append(
            f"{adj['adjacent_slice_median_ms']:.0f} vs {adj['cached_click_median_ms']:.0f} "
            f"= {adj['adjacent_over_cached_click']}x"
            if adj
            else "-"
        )
    rows.append(f"{'alone':<16}{'adjacent vs click':<22}" + "".join(f"{c:>28}" for c in cells))
    return "\n".join(rows)


def targets(result: dict) -> list[dict]:
    out = []
    for phase, kind, stat, limit in TARGETS:
        if phase not in result:
            continue
        value = result.get(phase, {}).get("by_kind", {}).get(kind, {}).get(stat)
        out.append(
            {"phase": phase, "request": kind, stat: value, "limit": limit, "met": value is not None and value <= limit}
        )
    adj = result.get("adjacent_slice")
    if adj:
        ratio = adj["adjacent_over_cached_click"]
        out.append({"phase": "alone", "request": "adjacent/cached", "ratio": ratio, "limit": 3, "met": ratio <= 3})
    for phase in ("inference_only", "with_training"):
        if phase in result:
            out.append(
                {
                    "phase": phase,
                    "request": "all",
                    "errors": result[phase]["errors"],
                    "limit": 0,
                    "met": result[phase]["errors"] == 0,
                }
            )
    return out


def run_mode(mode: str, args: argparse.Namespace, work: Path, shapes: dict, report: dict) -> None:
    app_dir, studies = fresh_copy(work, mode)
    conf = {"train_max_epochs": "2", "train_max_slices_per_volume": "4", **MODES[mode]}
    result: dict = {"conf": conf}
    report[mode] = result
    server = Server(studies, app_dir, work / f"{mode}.log", conf)
    try:
        requests.post(
            f"{server.url}/infer/medsam_2d",
            params={"image": "spleen_ct", "output": "json"},
            files={"params": (None, json.dumps({"foreground": [[60, 50, 12]]}))},
            timeout=600,
        )
        if args.adjacent_slices:
            result["adjacent_slice"] = adjacent_slice(server, shapes, args.adjacent_slices)
            print(mode, json.dumps(result["adjacent_slice"]), flush=True)
        result["inference_only"], rec_a = load_phase(
            server, args.annotators, args.seconds, shapes, None, think=args.think
        )
        print(mode, json.dumps(result["inference_only"], indent=1), flush=True)
        if args.training:
            result["with_training"], rec_b = load_phase(
                server,
                args.annotators,
                args.seconds,
                shapes,
                {"max_epochs": 2, "publish": "always"},
                think=args.think,
                training_seconds=args.training_seconds,
            )
            stats = requests.get(f"{server.url}/info/", timeout=600).json().get("train_stats", {}).get("medsam", {})
            keys = ("status", "published_version", "epoch")
            result["with_training"]["training_round"] = {k: stats.get(k) for k in keys}
            print(mode, json.dumps(result["with_training"], indent=1), flush=True)
            for image, hashes in rec_b.labels.items():
                rec_a.labels[image].extend(hashes)
        if mode == "scheduled" and args.train_kills:
            result["train_kills"] = train_kills(server, args.train_kills)
            print(mode, json.dumps(result["train_kills"]), flush=True)
        if mode == "scheduled" and not args.no_label_check:
            result["labels"] = label_check(server, rec_a, work / mode)
            print(mode, json.dumps(result["labels"]), flush=True)
    finally:
        server.stop()
    result["targets"] = targets(result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--annotators", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--think", type=float, default=1.0, help="seconds an annotator thinks between requests")
    ap.add_argument("--modes", default="scheduled,serial", help=f"comma-separated, from {sorted(MODES)}")
    ap.add_argument("--adjacent-slices", type=int, default=6, help="repeats of the one-annotator measure (0: off)")
    ap.add_argument("--no-training", dest="training", action="store_false", help="skip the training phase")
    ap.add_argument("--training-seconds", type=float, default=0, help="stop the round after this (0: let it end)")
    ap.add_argument("--publish-kills", type=int, default=40)
    ap.add_argument("--train-kills", type=int, default=3)
    ap.add_argument("--no-label-check", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        ap.error(f"--modes: unknown {unknown}; choose from {sorted(MODES)}")

    work = Path(tempfile.mkdtemp(prefix="bench_load_"))
    shapes = {name: nib.load(str(ROOT / "sample-data" / f"{name}.nii.gz")).shape for name in IMAGES}
    report: dict = {
        "machine": f"{os.cpu_count()} CPU cores, {round(psutil.virtual_memory().total / 2**30)} GiB",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "annotators": args.annotators,
        "seconds_per_phase": args.seconds,
        "think_s": args.think,
    }
    try:
        for mode in modes:
            try:
                run_mode(mode, args, work, shapes, report)
            except Exception as e:  # noqa: BLE001 - e.g. a server that did not start: the other modes still run
                report[mode] = {"failed": str(e)[:2000], "targets": []}
                print(mode, "FAILED:", str(e)[:300], flush=True)
        if args.publish_kills:
            report["publish_kills"] = publish_kills(args.publish_kills, work / "publish_kills")
            print(json.dumps(report["publish_kills"], indent=1))
    finally:
        report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
        shutil.rmtree(work, ignore_errors=True)
    print(side_by_side(report, modes))
    for mode in modes:
        for t in report[mode]["targets"]:
            print(mode, "MET " if t["met"] else "MISS", json.dumps(t))


if __name__ == "__main__":
    main()
