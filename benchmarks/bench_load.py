"""Many annotators on one server, with and without a training round; kills; nothing may be lost.

    .venv/bin/python benchmarks/bench_load.py [--annotators 8] [--seconds 120] [--publish-kills 40]
                                              [--train-kills 3] [--out results.json]

Against the real server (``lib.server:app`` on loopback, the shipped sample data, a fresh copy of
the app so training writes nowhere in the repository):

1. ``--annotators`` simulated annotators for ``--seconds``: each picks an image and slice, places a
   box or a first click, refines with two more clicks (per-client state), and every third session
   submits the resulting mask as a final label. Requests served, errors, p50/p95 latency per kind,
   and the server's resident memory (process tree, sampled every 0.5 s) before, at peak and after.
2. The same while a training round runs (started at the beginning, published when it finishes):
   which adapter versions answered, and whether any answer went back to an older one.
3. Kill points: a process that only publishes adapters, SIGKILLed ``--publish-kills`` times at random
   moments; and the server's real training subprocess SIGKILLed mid-round ``--train-kills`` times.
   Every time, the listed versions must all load and the server must keep answering.
4. The server itself is SIGKILLed and restarted on the same folders: every label accepted under
   load must be there byte for byte (latest per image), earlier ones in the label history.
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


def annotator(url: str, n: int, stop: threading.Event, rec: Recorder, shapes: dict[str, tuple]) -> None:
    rng = random.Random(n)
    session = 0
    while not stop.is_set():
        image = IMAGES[(n + session) % len(IMAGES)]
        sx, sy, sz = shapes[image]
        k = rng.randrange(sz)
        cx, cy = sx // 2 + rng.randint(-sx // 8, sx // 8), sy // 2 + rng.randint(-sy // 8, sy // 8)
        client = f"annotator-{n}"
        box = [cx - sx // 6, cx + sx // 6, cy - sy // 6, cy + sy // 6, k, k]
        steps = [
            ("box", {"roi": box}) if session % 2 else ("first_click", {"foreground": [[cx, cy, k]]}),
            ("refine_click", {"foreground": [[cx, cy, k], [cx + 2, cy + 3, k]]}),
            ("refine_click", {"foreground": [[cx, cy, k], [cx + 2, cy + 3, k]], "background": [[1, 1, k]]}),
        ]
        mask = None
        for kind, params in steps:
            body = {"client_id": client, "slice": k, "label": "organ", "reset_state": kind != "refine_click", **params}
            start = time.perf_counter()
            try:
                r = requests.post(
                    f"{url}/infer/medsam_2d",
                    params={"image": image},
                    files={"params": (None, json.dumps(body))},
                    timeout=600,
                )
                ms = (time.perf_counter() - start) * 1e3
                if r.status_code != 200:
                    raise RuntimeError(f"{kind} {r.status_code} {r.text[:200]}")
                params_part, mask = decode_infer_answer(r)
                rec.add(kind, ms, params_part.get("model_version"))
            except Exception as e:  # noqa: BLE001 - every failure is counted
                with rec.lock:
                    rec.errors.append(f"{kind}: {e}")
                mask = None
                break
        if mask is not None and session % 3 == 2:
            start = time.perf_counter()
            try:
                r = requests.put(
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


def load_phase(server: Server, annotators: int, seconds: float, shapes: dict, train: dict | None) -> dict:
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
        threading.Thread(target=annotator, args=(server.url, n, clicking, rec, shapes)) for n in range(annotators)
    ]
    start = time.time()
    for t in threads:
        t.start()
    time.sleep(seconds)
    if train is not None:  # keep clicking until the round is over and its adapters have answered a while
        cap = time.time() + 1800
        while (
            time.time() < cap
            and requests.get(f"{server.url}/train/", params={"check_if_running": True}, timeout=600).status_code == 200
        ):
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
    return out, rec


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--annotators", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--publish-kills", type=int, default=40)
    ap.add_argument("--train-kills", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_load_"))
    app_dir, studies = work / "app", work / "studies"
    shutil.copytree(APP, app_dir, ignore=shutil.ignore_patterns("model", "__pycache__", "logs"))
    studies.mkdir()
    for name in IMAGES:
        shutil.copy(ROOT / "sample-data" / f"{name}.nii.gz", studies)
    shapes = {name: nib.load(str(studies / f"{name}.nii.gz")).shape for name in IMAGES}
    conf = {"train_max_epochs": "2", "train_max_slices_per_volume": "4"}
    report: dict = {
        "machine": f"{os.cpu_count()} CPU cores, {round(psutil.virtual_memory().total / 2**30)} GiB",
        "annotators": args.annotators,
        "seconds_per_phase": args.seconds,
    }
    server = Server(studies, app_dir, work / "server.log", conf)
    try:
        requests.post(
            f"{server.url}/infer/medsam_2d",
            params={"image": "spleen_ct", "output": "json"},
            files={"params": (None, json.dumps({"foreground": [[60, 50, 12]]}))},
            timeout=300,
        )
        report["inference_only"], rec_a = load_phase(server, args.annotators, args.seconds, shapes, None)
        print(json.dumps(report["inference_only"], indent=1), flush=True)
        report["with_training"], rec_b = load_phase(
            server, args.annotators, args.seconds, shapes, {"max_epochs": 2, "publish": "always"}
        )
        stats = requests.get(f"{server.url}/info/", timeout=60).json().get("train_stats", {}).get("medsam", {})
        report["with_training"]["training_round"] = {k: stats.get(k) for k in ("status", "published_version", "epoch")}
        print(json.dumps(report["with_training"], indent=1), flush=True)
        report["train_kills"] = train_kills(server, args.train_kills)
        print(json.dumps(report["train_kills"]), flush=True)
        for image, hashes in rec_b.labels.items():
            rec_a.labels[image].extend(hashes)
        report["labels"] = label_check(server, rec_a, work)
    finally:
        server.stop()
    report["publish_kills"] = publish_kills(args.publish_kills, work / "publish_kills")
    print(json.dumps({k: report[k] for k in ("labels", "publish_kills")}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
