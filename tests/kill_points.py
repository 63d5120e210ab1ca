"""SIGKILL a process that publishes adapters as fast as it can, at random moments (tests, benchmarks)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "apps" / "medsam_adapter"

# a training process that does nothing but publish new adapter versions; a training history in the
# metrics makes each write last long enough to be hit
PUBLISHER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from lib.core.backbones import build_backbone
    from lib.core.config import AdapterSettings
    from lib.core.engine import publish_adapters
    from lib.core.model import AdaptedSam

    model = AdaptedSam(build_backbone(sys.argv[3]), AdapterSettings(), labels=("spleen",))
    history = [float(i) for i in range(int(sys.argv[4]))]
    print("ready", flush=True)
    while True:
        with torch.no_grad():
            for p in model.adaptable_state().values():
                p.add_(0.01)
        publish_adapters(model, Path(sys.argv[2]), {"history": history})
    """
)


@dataclass
class KillReport:
    kills: int = 0
    during_a_write: int = 0  # kills that left a temporary file behind: the process died mid-write
    versions: list[int] | None = None  # published versions after the last kill
    broken: int = 0  # listed versions that did not load, or loaded as another version


def kill_publisher(
    folder: Path,
    backbone: str,
    kills: int,
    *,
    until_mid_write: int = 0,
    max_kills: int = 0,
    history: int = 0,
    max_delay: float = 0.5,
    seed: int = 0,
) -> KillReport:
    """Start the publisher, SIGKILL it after a random delay, check every newly listed version loads;
    ``kills`` times, and on until ``until_mid_write`` kills hit a write (at most ``max_kills``).
    The caller has the app folder on ``sys.path`` (as the tests and benchmarks do)."""
    from lib.core.checkpoint import AdapterCheckpoint
    from lib.core.engine import adapter_path, published_versions

    rng = random.Random(seed)
    report, checked = KillReport(), set()
    while report.kills < kills or (report.during_a_write < until_mid_write and report.kills < max_kills):
        report.kills += 1
        proc = subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, str(APP), str(folder), backbone, str(history)],
            stdout=subprocess.PIPE,
            text=True,
        )
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the publisher did not start")
        time.sleep(rng.uniform(0.0, max_delay))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        report.during_a_write += bool(list(folder.glob(".adapter_v*.tmp")))
        report.versions = published_versions(folder)
        for v in set(report.versions) - checked:  # a published file never changes: check it once
            try:
                report.broken += AdapterCheckpoint.load(adapter_path(folder, v)).version != v
            except Exception:  # noqa: BLE001 - any unreadable listed file counts
                report.broken += 1
            checked.add(v)
    return report
