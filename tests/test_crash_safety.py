"""Publishing adapters survives SIGKILL at any moment: no partial file is ever listed or served."""

from __future__ import annotations

from kill_points import kill_publisher

KILL_POINTS = 12  # at least, and until MID_WRITE_KILLS of them landed while a file was being written
MID_WRITE_KILLS = 3
MAX_KILLS = 80


def test_killing_the_publisher_at_any_moment_leaves_the_last_good_version(tmp_path):
    from lib.core.config import parse_profile
    from lib.core.engine import InteractiveSegmenter

    adapters = tmp_path / "adapters"
    report = kill_publisher(
        adapters, "tiny", KILL_POINTS, until_mid_write=MID_WRITE_KILLS, max_kills=MAX_KILLS, history=30_000
    )
    versions, kills, mid_write = report.versions, report.kills, report.during_a_write
    assert versions, "the publisher never got to write a version"
    assert report.broken == 0, f"{report.broken} listed versions were incomplete or not loadable"
    assert mid_write >= MID_WRITE_KILLS, f"only {mid_write} of {kills} kills landed during a checkpoint write"

    # a server starting on that folder serves the newest complete version; a broken file that did
    # not come from the trainer (copied by hand) is skipped in favour of the newest good one
    (adapters / f"adapter_v{versions[-1] + 1:04d}.pt").write_bytes(b"truncated copy")
    profile = parse_profile({"name": "tiny", "backbone": "tiny", "labels": ["spleen"]})
    segmenter = InteractiveSegmenter(profile, adapter_dir=adapters, device="cpu")
    assert segmenter.current().version == versions[-1]
    print(f"{kills} kill points, {mid_write} during a checkpoint write, {len(versions)} versions, none broken")
