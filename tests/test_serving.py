"""Serving under concurrency: the scheduler on its own, then the real server over HTTP.

Ordering, not wall time: a click sent while another client's 3D propagation runs must come back
before that propagation does; /info must answer while it runs; a full queue answers 503 and the
server serves again afterwards; prefetch fills the embedding cache without exceeding its budget.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from live_server import Server

from conftest import APP, studies_copy
from lib.core.volume import volume_from_bytes
from lib.serving.scheduler import (
    InferenceScheduler,
    Overloaded,
    Priority,
    SchedulerSettings,
    ServingConfigError,
)

SPLEEN = "spleen_ct"


# -- the scheduler alone ---------------------------------------------------------------------------
def held_scheduler(**kw) -> tuple[InferenceScheduler, threading.Event, list]:
    """A one-worker scheduler whose worker is held by a running job until the event is set."""
    settings = SchedulerSettings(general_workers=1, click_lane=False, **kw)
    scheduler = InferenceScheduler(settings)
    release, started, order = threading.Event(), threading.Event(), []

    def hold() -> None:
        started.set()
        release.wait(10)

    scheduler.submit(Priority.VOLUME, "holder", hold)
    assert started.wait(10)
    return scheduler, release, order


def test_priorities_first_then_round_robin_between_clients():
    scheduler, release, order = held_scheduler()
    futures = []
    for priority, client, name in [
        (Priority.PREFETCH, "a", "prefetch-a"),
        (Priority.VOLUME, "a", "3d-a"),
        (Priority.FIRST_PROMPT, "a", "first-a1"),
        (Priority.FIRST_PROMPT, "a", "first-a2"),
        (Priority.FIRST_PROMPT, "b", "first-b1"),
        (Priority.CLICK, "c", "click-c"),
        (Priority.FIRST_PROMPT, "a", "first-a3"),
        (Priority.FIRST_PROMPT, "b", "first-b2"),
    ]:
        futures.append(scheduler.submit(priority, client, lambda name=name: order.append(name)))
    release.set()
    for f in futures:
        f.result(10)
    assert order == ["click-c", "first-a1", "first-b1", "first-a2", "first-b2", "first-a3", "3d-a", "prefetch-a"]
    scheduler.close()


def test_full_queues_reject_interactive_jobs_and_drop_old_background_jobs():
    scheduler, release, _ = held_scheduler(queue_limit=3, client_queue_limit=2, prefetch_queue_limit=2)
    scheduler.submit(Priority.CLICK, "a", lambda: "a1")
    scheduler.submit(Priority.CLICK, "a", lambda: "a2")
    with pytest.raises(Overloaded) as per_client:
        scheduler.submit(Priority.CLICK, "a", lambda: "a3")
    assert "client 'a'" in str(per_client.value) and per_client.value.retry_after >= 1
    scheduler.submit(Priority.FIRST_PROMPT, "b", lambda: "b1")
    with pytest.raises(Overloaded, match="server's"):
        scheduler.submit(Priority.CLICK, "c", lambda: "c1")
    first = scheduler.submit(Priority.PREFETCH, "p", lambda: "p1", key="k1")
    assert scheduler.submit(Priority.PREFETCH, "p", lambda: "again", key="k1") is first  # one job per key
    scheduler.submit(Priority.PREFETCH, "p", lambda: "p2", key="k2")
    third = scheduler.submit(Priority.PREFETCH, "p", lambda: "p3", key="k3")
    assert first.cancelled(), "the oldest background job makes room"
    stats = scheduler.stats()
    assert stats["waiting"] == {"click": 2, "first_prompt": 1, "volume": 0, "prefetch": 2}
    assert stats["rejected"] == 2 and stats["dropped"] == 1
    release.set()
    assert third.result(10) == "p3"
    assert scheduler.submit(Priority.CLICK, "a", lambda: "later").result(10) == "later"  # room again
    scheduler.close()


def test_background_jobs_wait_while_anything_runs():
    settings = SchedulerSettings(general_workers=1, click_lane=True)
    scheduler = InferenceScheduler(settings)
    release, started, order = threading.Event(), threading.Event(), []

    def click() -> None:
        started.set()
        release.wait(10)
        order.append("click")

    scheduler.submit(Priority.CLICK, "a", click)
    assert started.wait(10)
    background = scheduler.submit(Priority.PREFETCH, "p", lambda: order.append("prefetch"))
    time.sleep(0.3)  # the general worker is idle, but a click runs: the prefetch must not start
    assert order == [] and not background.done()
    release.set()
    background.result(10)
    assert order == ["click", "prefetch"]
    scheduler.close()


def test_general_workers_run_below_the_click_lane():
    import os

    base = os.getpriority(os.PRIO_PROCESS, 0)
    scheduler = InferenceScheduler(SchedulerSettings(general_workers=1, click_lane=True, worker_nice=3))
    started, hold = threading.Event(), threading.Event()

    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def encode() -> int:
        started.set()
        hold.wait(10)
        return niceness()

    busy = scheduler.submit(Priority.FIRST_PROMPT, "a", encode)
    assert started.wait(10)
    # the general worker is busy: this click can only run on the click lane
    assert scheduler.submit(Priority.CLICK, "b", niceness).result(10) == base
    hold.set()
    assert busy.result(10) == min(19, base + 3)
    scheduler.close()


def test_serving_options_are_checked_once_with_clear_errors():
    assert SchedulerSettings.from_conf({}) == SchedulerSettings()
    parsed = SchedulerSettings.from_conf({"scheduler": "off", "scheduler_workers": "3", "prefetch_slices": "4"})
    assert (parsed.enabled, parsed.general_workers, parsed.prefetch_slices) == (False, 3, 4)
    with pytest.raises(ServingConfigError, match="scheduler_workers: expected a whole number"):
        SchedulerSettings.from_conf({"scheduler_workers": "two"})
    with pytest.raises(ServingConfigError, match="scheduler_queue_limit: must be between"):
        SchedulerSettings.from_conf({"scheduler_queue_limit": "0"})
    with pytest.raises(ServingConfigError, match="prefetch_on_open: expected true or false"):
        SchedulerSettings.from_conf({"prefetch_on_open": "maybe"})


# -- the real server -------------------------------------------------------------------------------
def start(tmp_path_factory, name: str, conf: dict[str, str]) -> Server:
    base = tmp_path_factory.mktemp(name)
    app_dir = base / "app"
    shutil.copytree(APP, app_dir, ignore=shutil.ignore_patterns("model", "__pycache__", "logs"))
    return Server(studies_copy(base / "studies"), app_dir, base / "server.log", {"models": "lite_medsam", **conf})


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory):
    # no prefetch (the tests count encodes), small queues so that overload is reachable; concurrent
    # encodes batched (what auto does on CUDA), so the concurrency tests cover the batcher over HTTP
    conf = {"prefetch_slices": "0", "scheduler_client_queue_limit": "2", "encode_batch": "4"}
    srv = start(tmp_path_factory, "serving", conf)
    yield srv
    srv.stop()


def infer(url: str, task: str, params: dict, image: str = SPLEEN) -> requests.Response:
    return requests.post(
        f"{url}/infer/{task}",
        params={"image": image},
        files={"params": (None, json.dumps({"result_extension": ".nrrd", **params}))},
        timeout=900,
    )


def label_of(response: requests.Response) -> tuple[np.ndarray, dict]:
    from lib.core.eval_backends import decode_infer_answer

    assert response.status_code == 200, response.text[:300]
    params, image = decode_infer_answer(response)
    return volume_from_bytes(image, ".nrrd").array, params


def session(url: str, client: str, k: int, shift: int) -> list[np.ndarray]:
    """One annotator: a click, a second click, a box with both clicks (refinement state per client)."""
    steps = [
        {"foreground": [[70 + shift, 75, k]], "reset_state": True},
        {"foreground": [[70 + shift, 75, k], [78 + shift, 82, k]]},
        {"foreground": [[70 + shift, 75, k], [78 + shift, 82, k]], "roi": [40, 120, 40, 120, k, k]},
    ]
    return [label_of(infer(url, "medsam_2d", {"client_id": client, "label": "spleen", **s}))[0] for s in steps]


def test_answers_under_concurrency_equal_solo_answers(busy_server):
    clients = [(f"client-{n}", 12 + n % 2, 3 * n) for n in range(6)]
    solo = {c: session(busy_server.url, c, k, shift) for c, k, shift in clients}
    with ThreadPoolExecutor(len(clients)) as pool:
        together = dict(
            zip(
                [c for c, _, _ in clients],
                pool.map(lambda args: session(busy_server.url, *args), clients),
                strict=True,
            )
        )
    for client, masks in solo.items():
        assert any(m.any() for m in masks), f"{client}: empty masks prove nothing"
        for step, (alone, concurrent) in enumerate(zip(masks, together[client], strict=True)):
            np.testing.assert_array_equal(alone, concurrent, err_msg=f"{client} step {step}")


def scheduler_stats(url: str) -> dict:
    return requests.get(f"{url}/prefetch/medsam_2d", timeout=30).json()["scheduler"]


def test_clicks_and_info_are_answered_while_another_clients_3d_request_runs(busy_server):
    url = busy_server.url
    label_of(infer(url, "medsam_2d", {"client_id": "clicker", "foreground": [[80, 80, 13]]}))  # slice 13 cached
    finished: dict[str, float] = {}
    answers: dict[str, requests.Response] = {}

    def run(name: str, task: str, params: dict) -> None:
        answers[name] = infer(url, task, params)
        finished[name] = time.perf_counter()

    roi = [40, 130, 40, 130, 9, 17]  # propagation over up to 9 slices, 8 of them to encode
    propagation = threading.Thread(target=run, args=("3d", "medsam_3d", {"client_id": "volume", "roi": roi}))
    propagation.start()
    deadline = time.time() + 300
    while scheduler_stats(url)["running"]["volume"] == 0:
        assert time.time() < deadline and "3d" not in answers, "the 3D request never started"
        time.sleep(0.1)
    info = requests.get(f"{url}/info/", timeout=60)
    info_done = time.perf_counter()
    run("click", "medsam_2d", {"client_id": "clicker", "foreground": [[80, 80, 13], [84, 86, 13]]})
    propagation.join()
    assert info.status_code == 200 and "medsam_2d" in info.json()["models"]
    assert info.json()["serving"]["scheduler"]["running"]["volume"] == 1  # /info shows the queues
    assert info_done < finished["3d"], "/info waited for the 3D request"
    click, click_params = label_of(answers["click"])
    assert click_params["embedding_cached"] and click.any()
    assert finished["click"] < finished["3d"], "the click waited for another client's 3D request"
    volume, params = label_of(answers["3d"])
    assert params["slices_segmented"] >= 3 and len(np.nonzero(volume.any(axis=(0, 1)))[0]) >= 3


def test_overload_answers_503_with_retry_after_and_recovers(busy_server):
    url = busy_server.url
    # the same propagation as above (its embeddings are cached), state reset: every answer is the same
    burst = {"client_id": "burst", "roi": [40, 130, 40, 130, 9, 17], "reset_state": True}
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: infer(url, "medsam_3d", burst), range(6)))
    codes = sorted(r.status_code for r in answers)
    assert codes.count(200) >= 1 and codes.count(503) >= 1 and set(codes) <= {200, 503}, codes
    refused = next(r for r in answers if r.status_code == 503)
    assert int(refused.headers["Retry-After"]) >= 1 and "queue is full" in refused.json()["detail"]
    again = infer(url, "medsam_3d", burst)
    assert again.status_code == 200
    ok = [label_of(r)[0] for r in answers if r.status_code == 200]
    for mask in ok:  # the refused requests changed nothing for the accepted ones
        np.testing.assert_array_equal(mask, label_of(again)[0])


@pytest.fixture(scope="module")
def small_cache_server(tmp_path_factory):
    # LiteMedSAM embeddings are 4.19 MB, and with the shipped adapters (they change the encoder) a slice needs
    # two (the base model's for boxes and a lone click's candidates): a 42 MB cache holds 5 slices
    srv = start(tmp_path_factory, "prefetch", {"embedding_cache_mb": "42", "prefetch_slices": "2"})
    yield srv
    srv.stop()


def prefetch_status(url: str, image: str) -> dict:
    r = requests.get(f"{url}/prefetch/medsam_2d", params={"image": image}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_idle(url: str, image: str, budget: dict, seconds: float = 600) -> dict:
    """Poll until nothing waits or runs, checking the cache budget on every poll."""
    deadline = time.time() + seconds
    while True:
        status = prefetch_status(url, image)
        cache = status["embedding_cache"]
        assert cache["bytes"] <= cache["max_bytes"], cache
        budget["peak"] = max(budget.get("peak", 0), cache["bytes"])
        sched = status["scheduler"]
        if not any(sched["waiting"].values()) and not any(sched["running"].values()):
            return status
        assert time.time() < deadline, status
        time.sleep(0.2)


def test_prefetch_encodes_neighbours_within_the_cache_budget(small_cache_server):
    url, image, budget = small_cache_server.url, "abdomen_mr", {}
    first = label_of(infer(url, "medsam_2d", {"client_id": "a", "foreground": [[58, 45, 10]]}, image))[1]
    assert not first["embedding_cached"]
    status = wait_idle(url, image, budget)
    assert status["embedding_cache"]["entries"] == 10  # slice 10 and 11, 9, 12, 8, two embeddings each
    # moving to the next slice is now a click on a cached embedding
    nxt = label_of(infer(url, "medsam_2d", {"client_id": "a", "foreground": [[58, 45, 11]]}, image))[1]
    assert nxt["embedding_cached"] and nxt["latency_ms"]["encoder"] == 0
    # a whole-volume range stops at half the budget and says so
    r = requests.post(f"{url}/prefetch/medsam_2d", params={"image": "spine_t2_sct"}, timeout=300)
    assert r.status_code == 202, r.text
    status = wait_idle(url, "spine_t2_sct", budget)
    progress = status["range"]
    assert progress["state"] == "limited" and "50%" in progress["detail"], progress
    assert 1 <= progress["encoded"] <= 3 and progress["total"] == 52
    assert budget["peak"] <= status["embedding_cache"]["max_bytes"]
    # bad requests get 4xx with the reason
    assert requests.post(f"{url}/prefetch/medsam_2d", params={"image": "nope"}, timeout=30).status_code == 404
    assert requests.post(f"{url}/prefetch/nope", params={"image": image}, timeout=30).status_code == 404
    bad = requests.post(f"{url}/prefetch/medsam_2d", params={"image": image, "window": "x"}, timeout=30)
    assert bad.status_code == 422 and "window" in bad.json()["detail"]


def test_fortran_ordered_writer_input_keeps_every_voxel(tmp_path):
    from lib.core.volume import load_volume, write_label
    from lib.infers.tasks import fortran_label

    rng = np.random.default_rng(0)
    label = np.zeros((37, 29, 11), np.uint8)
    label[5:20, 3:9, 4] = 1
    label[:, :, 7] = rng.integers(0, 3, size=(37, 29))
    affine = np.diag([0.8, 0.7, 2.5, 1.0])
    for ext, compress, dtype in ((".nrrd", True, "uint8"), (".nrrd", False, "int16"), (".nii.gz", True, "uint8")):
        ordered = fortran_label(label, dtype)
        assert ordered.flags.f_contiguous and ordered.dtype == dtype
        path = write_label(ordered, affine, tmp_path / f"label{ext}", compress=compress)
        back = load_volume(path)
        np.testing.assert_array_equal(back.array, label.astype(dtype))
        np.testing.assert_allclose(back.affine, affine)


def test_a_precomputed_range_runs_middle_out_one_job_at_a_time_within_its_cache_share():
    """A real segmenter (the tiny random backbone: fast encodes) and the real scheduler, no server."""
    from conftest import SAMPLE
    from lib.core.config import parse_profile
    from lib.core.engine import InteractiveSegmenter
    from lib.serving.prefetch import Prefetcher

    profile = parse_profile({"name": "tiny", "backbone": "tiny", "inference": {"encoder_runtime": "torch"}})
    path = str(SAMPLE / "abdomen_mr.nii.gz")  # 20 slices
    scheduler = InferenceScheduler(SchedulerSettings(general_workers=1, click_lane=False, worker_nice=0))
    try:
        whole = InteractiveSegmenter(profile, device="cpu", embedding_cache_mb=200)
        prefetcher = Prefetcher(scheduler, depth=2)
        progress = prefetcher.precompute(whole, "tiny_2d", "mr", path, first=8, last=11)
        assert scheduler.stats()["waiting"]["prefetch"] <= 1  # one queued step per range, not four jobs
        deadline = time.time() + 600
        while progress.state in ("queued", "running"):
            assert time.time() < deadline, progress
            time.sleep(0.05)
        assert (progress.state, progress.done, progress.encoded, progress.total) == ("done", 4, 4, 4)
        assert all(whole.has_embedding(path, k) for k in range(8, 12))
        assert not whole.has_embedding(path, 7) and not whole.has_embedding(path, 12)

        per_slice = whole.embeddings.nbytes / len(whole.embeddings)
        small = InteractiveSegmenter(profile, device="cpu", embedding_cache_mb=per_slice * 5.5 / 1e6)
        limited = prefetcher.precompute(small, "tiny_2d", "mr", path)
        while limited.state in ("queued", "running"):
            assert time.time() < deadline, limited
            time.sleep(0.05)
        assert limited.state == "limited" and limited.encoded == 2, limited  # half of 5.5 slices
        assert small.embeddings.nbytes <= small.embeddings.max_bytes
        assert small.has_embedding(path, 9) and small.has_embedding(path, 10)  # the middle (of 0..19) first, then out
    finally:
        scheduler.close()


def test_an_objects_lone_first_click_is_a_first_prompt_and_corrections_are_clicks():
    """A lone click answers its scale candidates (several decoder passes): it must not hold up the click
    lane that other annotators' corrections use."""
    from lib.serving.infer_route import is_lone_click

    assert is_lone_click({"foreground": [[80, 80, 13]]})
    assert is_lone_click({"foreground": [[80, 80, 13]], "background": []})
    assert not is_lone_click({"foreground": [[80, 80, 13], [84, 86, 13]]})
    assert not is_lone_click({"foreground": [[80, 80, 13]], "background": [[10, 10, 13]]})
    assert not is_lone_click({"foreground": [[80, 80, 13]], "roi": [60, 100, 60, 100, 13, 13]})
    assert not is_lone_click({"roi": [60, 100, 60, 100, 13, 13]})
