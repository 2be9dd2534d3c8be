"""The Hugging Face Hub path, end to end through huggingface_hub's own client.

Against the fake Hub on 127.0.0.1 (tests/fakehub.py): writes are batched into few
commits, a failed commit publishes nothing, reconstruction outputs land in one
commit, and reads are exact HTTP ranges. ``test_live_hub`` runs the same round trip
against the real Hub when ``PHEMA_LIVE_HUB=1`` and ``HF_TOKEN`` are set.
"""

import os
import uuid

import pytest
import torch
from torch import nn

from phema import PowerFunctionEMA, SnapshotStore, SnapshotWriter, StorageError
from phema.profiles import sigma_rel_to_gamma
from phema.streaming import reconstruct


def _run(store, saves, every=1):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 2))
    ema = PowerFunctionEMA(net)
    with SnapshotWriter(store, t_unit="images") as writer:
        for step in range(1, saves * every + 1):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.01 * torch.randn_like(p))
            ema.update(step * 16)
            if step % every == 0:
                writer.save(ema, step=step)
                yield writer
    return net


def _repo(fake_hub, url):
    owner, name = url.removeprefix("hf://").split("/")[:2]
    return fake_hub.repos[("model", f"{owner}/{name}")]


def test_writes_are_batched_into_few_commits(fake_hub, hub_repo):
    url = f"{hub_repo}/snapshots"
    store = SnapshotStore(url, hub_batch_files=4)
    for _ in _run(store, saves=5):
        pass
    repo = _repo(fake_hub, url)
    # 10 files: commits of 4 and 4 when due, then the last 2 at close.
    assert [len(c["files"]) for c in repo.commits] == [4, 4, 2]
    infos = SnapshotStore(url).list()
    assert len(infos) == 10
    assert sorted({i.t for i in infos}) == [16.0 * k for k in range(1, 6)]
    assert all(f.startswith("snapshots/phema-") for c in repo.commits for f in c["files"])


def test_pending_files_are_not_listed(fake_hub, hub_repo):
    url = f"{hub_repo}/snapshots"
    store = SnapshotStore(url, hub_batch_files=100)
    store.save({"w": torch.ones(3)}, t=1.0, std=0.05, gamma=float(sigma_rel_to_gamma(0.05)))
    assert store.hub.pending == ["phema-000000000001-0.0500.safetensors"]
    assert store.exists("phema-000000000001-0.0500.safetensors")  # no second write of it
    with pytest.raises(StorageError, match="does not exist"):
        SnapshotStore(url).list()  # not even the folder is visible before the commit
    store.flush()
    assert [i.t for i in SnapshotStore(url).list()] == [1.0]


def test_failed_commit_publishes_nothing_surfaces_and_later_saves_go_on(fake_hub, hub_repo):
    url = f"{hub_repo}/snapshots"
    store = SnapshotStore(url, hub_batch_files=4)
    SnapshotStore(url).hub._target()  # create the repository first
    fake_hub.fail_commits = 1
    run = _run(store, saves=3)
    with pytest.raises(StorageError, match=r"committing 4 file\(s\) to hf://.* failed, none was"):
        for _ in run:
            pass
    run.close()  # the loop's `with SnapshotWriter` closes: the last snapshot is committed
    # The failed commit's 4 files (t=16, 32) are absent; the snapshot after them is whole.
    assert sorted(_repo(fake_hub, url).files) == [
        "snapshots/phema-000000000048-0.0500.safetensors",
        "snapshots/phema-000000000048-0.1000.safetensors",
    ]
    assert store.hub.pending == []
    spool = store.hub._spool
    assert spool is None or os.listdir(spool) == []  # spooled copies are cleaned up


def test_reconstruction_outputs_share_one_commit_and_reads_are_ranged(fake_hub, hub_repo):
    src, out = f"{hub_repo}/snapshots", f"{hub_repo}/ema"
    for _ in _run(SnapshotStore(src, hub_batch_files=64), saves=8):
        pass
    repo = _repo(fake_hub, src)
    commits_before = len(repo.commits)
    start = len(fake_hub.requests)
    results = reconstruct(src, [0.05, 0.08, 0.12], out, window_bytes=1024)
    assert len(repo.commits) == commits_before + 1
    assert sorted(repo.commits[-1]["files"]) == sorted(
        "ema/" + os.path.basename(r.path) for r in results
    )
    downloads = [r for r in fake_hub.requests[start:] if "/resolve/" in r[1]]
    assert downloads
    assert all(rng is not None for _, _, rng in downloads)  # never a whole-file download
    fake_hub.fail_commits = 1
    with pytest.raises(StorageError, match="none was published"):
        reconstruct(src, [0.05], f"{hub_repo}/ema2")
    assert not any(p.startswith("ema2/") for p in repo.files)


@pytest.mark.skipif(
    not (os.environ.get("PHEMA_LIVE_HUB") == "1" and os.environ.get("HF_TOKEN")),
    reason="live Hub test: set PHEMA_LIVE_HUB=1 and HF_TOKEN (creates and deletes a private repo)",
)
def test_live_hub():
    import fsspec
    from huggingface_hub import HfApi

    saved = fsspec.config.conf.pop("hf", None)  # the real endpoint, not the fake one
    api = HfApi(token=os.environ["HF_TOKEN"])
    repo_id = f"{api.whoami()['name']}/phema-live-{uuid.uuid4().hex[:8]}"
    try:
        url = f"hf://{repo_id}/snapshots"
        for _ in _run(SnapshotStore(url), saves=4):
            pass
        assert len(SnapshotStore(url).list()) == 8
        (res,) = reconstruct(url, [0.07], f"hf://{repo_id}/ema")
        assert res.fit.rel_error < 0.05
    finally:
        api.delete_repo(repo_id, missing_ok=True)
        if saved is not None:
            fsspec.config.conf["hf"] = saved


def test_listing_a_missing_repository_does_not_create_it(fake_hub, hub_repo):
    with pytest.raises(StorageError, match="does not exist"):
        SnapshotStore(f"{hub_repo}/run").list()
    assert _repo_or_none(fake_hub, hub_repo) is None


def _repo_or_none(fake_hub, url):
    owner, name = url.removeprefix("hf://").split("/")[:2]
    return fake_hub.repos.get(("model", f"{owner}/{name}"))


@pytest.mark.slow
def test_commit_without_an_answer_says_it_may_still_land(fake_hub, hub_repo, monkeypatch):
    # huggingface_hub waits forever by default; phema gives a commit `upload_timeout`
    # seconds and then reports it honestly: it may still land, so it is not "none was
    # published". Whatever happens after, the file is listed whole or not at all.
    import time

    url = f"{hub_repo}/run"
    store = SnapshotStore(url, hub_batch_files=100)
    store.save({"w": torch.ones(3)}, t=64.0, std=0.05, gamma=float(sigma_rel_to_gamma(0.05)))
    store.hub.upload_timeout = 0.5
    real = store.hub._api.create_commit

    def slow_commit(*args, **kwargs):
        time.sleep(1.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(store.hub._api, "create_commit", slow_commit)
    with pytest.raises(
        StorageError, match=r"did not answer within 0.5 s; the commit of .* may still land"
    ):
        store.flush()
    time.sleep(2.0)
    try:
        listed = SnapshotStore(url).list()
    except StorageError as exc:  # it did not land: not even the folder exists
        assert "does not exist" in str(exc)  # noqa: PT017
        listed = []
    for info in listed:
        assert torch.equal(SnapshotStore(url).load(info)["w"], torch.ones(3))
