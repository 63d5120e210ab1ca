"""Publishing adapters survives SIGKILL at any moment: no partial file is ever listed or served."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

from conftest import APP

KILL_POINTS = 12  # at least, and until MID_WRITE_KILLS of them landed while a file was being written
MID_WRITE_KILLS = 3
MAX_KILLS = 80

# a training process that does nothing but publish new adapter versions as fast as it can
PUBLISHER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from lib.core.backbones import build_backbone
    from lib.core.config import AdapterSettings
    from lib.core.engine import publish_adapters
    from lib.core.model import AdaptedSam

    model = AdaptedSam(build_backbone("tiny"), AdapterSettings(), labels=("spleen",))
    history = [float(i) for i in range(30_000)]  # a training history: each write takes ~0.1 s
    print("ready", flush=True)
    while True:
        with torch.no_grad():
            for p in model.adaptable_state().values():
                p.add_(0.01)
        publish_adapters(model, Path(sys.argv[2]), {"history": history})
    """
)


def test_killing_the_publisher_at_any_moment_leaves_the_last_good_version(tmp_path):
    from lib.core.checkpoint import AdapterCheckpoint
    from lib.core.config import parse_profile
    from lib.core.engine import InteractiveSegmenter, adapter_path, published_versions

    adapters = tmp_path / "adapters"
    rng = random.Random(0)
    mid_write = kills = 0
    while kills < KILL_POINTS or (mid_write < MID_WRITE_KILLS and kills < MAX_KILLS):
        kills += 1
        proc = subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, str(APP), str(adapters)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        mid_write += bool(list(adapters.glob(".adapter_v*.tmp")))
        versions = published_versions(adapters)
        for v in versions:  # every listed file is complete and loadable
            assert AdapterCheckpoint.load(adapter_path(adapters, v)).version == v
    assert versions, "the publisher never got to write a version"
    assert mid_write >= MID_WRITE_KILLS, f"only {mid_write} of {kills} kills landed during a checkpoint write"

    # a server starting on that folder serves the newest complete version; a broken file that did
    # not come from the trainer (copied by hand) is skipped in favour of the newest good one
    (adapters / f"adapter_v{versions[-1] + 1:04d}.pt").write_bytes(b"truncated copy")
    profile = parse_profile({"name": "tiny", "backbone": "tiny", "labels": ["spleen"]})
    segmenter = InteractiveSegmenter(profile, adapter_dir=adapters, device="cpu")
    assert segmenter.current().version == versions[-1]
    print(f"{kills} kill points, {mid_write} during a checkpoint write, {len(versions)} versions, none broken")
