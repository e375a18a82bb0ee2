"""The trainer's batch path (janus_job.train.batches): the loader feed walks the sampler's plan epoch after
epoch without touching the trained position, and the prefetcher hands batches over in order, reads at most
`depth` ahead, passes loader errors on at the batch they belong to and stops cleanly. CPU: the thread, the
queue and the hand-over are the GPU path's; only the side stream is absent."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from janus_job.data.sampler import BalancedBatchSampler
from janus_job.errors import JobError
from janus_job.train.batches import BatchPrefetcher, LoaderFeed
from janus_job.train.engine import HOST_KEYS

CPU = torch.device("cpu")
WAIT_S = 60  # bound on waiting for the feeding thread (a hang fails instead of blocking the suite)


class CountingSource:
    """Batches {"i": tensor([i])}; records how many `next()` calls the consumer had made at each read."""

    def __init__(self, count: int, fail_at: int | None = None) -> None:
        self.count, self.fail_at = count, fail_at
        self.asked = 0  # the consumer's next() calls begun (set by the test before each call)
        self.reads: list[int] = []  # self.asked at the time of each read
        self.closed = False
        self.filled = threading.Event()
        self.fill_target = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        i = len(self.reads)
        if i == self.count:
            raise StopIteration
        if i == self.fail_at:
            raise JobError(f"sample s{i}: stored feature is corrupt")
        self.reads.append(self.asked)
        if len(self.reads) >= self.fill_target:
            self.filled.set()
        return {"i": torch.tensor([i]), "images_per_sample": torch.tensor([1]), "sample_ids": [f"s{i}"]}

    def close(self) -> None:
        self.closed = True


def take(prefetcher: BatchPrefetcher, source: CountingSource) -> tuple[dict, object]:
    source.asked += 1
    return next(prefetcher)


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetcher_reads_ahead_by_depth_and_never_further(depth):
    source = CountingSource(12)
    source.fill_target = depth
    prefetcher = BatchPrefetcher(source, CPU, depth, inspect=lambda batch: int(batch["i"]) * 10)
    assert source.filled.wait(WAIT_S), "the feeding thread did not read ahead"
    assert source.asked == 0 and len(source.reads) >= depth  # read before the step asked
    got = [take(prefetcher, source) for _ in range(12)]
    assert [int(batch["i"]) for batch, _ in got] == list(range(12))  # in order
    assert [info for _, info in got] == [10 * i for i in range(12)]  # inspect ran on each, in order
    assert got[0][0]["sample_ids"] == ["s0"] and set(got[0][0]) == {"i", "images_per_sample", "sample_ids"}
    # read i happened only after the step had asked for batch i - depth: at most `depth` read ahead
    assert all(i < asked + depth for i, asked in enumerate(source.reads)), source.reads
    with pytest.raises(StopIteration):
        take(prefetcher, source)
    prefetcher.close()
    assert source.closed


def test_depth_zero_reads_in_the_callers_thread_when_asked():
    source = CountingSource(4)
    prefetcher = BatchPrefetcher(source, CPU, 0)
    assert prefetcher._thread is None and source.reads == []
    for i in range(4):
        batch, info = take(prefetcher, source)
        assert int(batch["i"]) == i and info is None
        assert source.reads == list(range(1, i + 2))  # one read per next(), none ahead
    prefetcher.close()
    assert source.closed


@pytest.mark.parametrize("depth", [0, 2])
def test_a_loader_error_arrives_with_the_batch_it_belongs_to(depth):
    source = CountingSource(10, fail_at=3)
    prefetcher = BatchPrefetcher(source, CPU, depth)
    assert [int(take(prefetcher, source)[0]["i"]) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(JobError, match="sample s3: stored feature is corrupt"):
        take(prefetcher, source)
    with pytest.raises(StopIteration):  # the feed is over after its error
        take(prefetcher, source)
    prefetcher.close()


def test_close_stops_the_feeding_thread_and_closes_the_source():
    source = CountingSource(1000)
    source.fill_target = 2
    prefetcher = BatchPrefetcher(source, CPU, 2)
    assert source.filled.wait(WAIT_S)
    take(prefetcher, source)
    thread = prefetcher._thread
    prefetcher.close()
    assert not thread.is_alive() and source.closed
    assert len(source.reads) <= 3  # nothing read past the depth while it stopped
    with pytest.raises(StopIteration):
        next(prefetcher)


def test_host_keys_stay_on_the_host():
    """micro_step reads these on the host; the prefetcher must leave them there (on a GPU too)."""
    assert {"image_grid_thw", "images_per_sample"} == set(HOST_KEYS)


class Items(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 20

    def __getitem__(self, index: int) -> dict:
        return {"index": torch.tensor([index])}


def collate(items: list[dict]) -> dict:
    return {"index": torch.cat([item["index"] for item in items])}


def loader_settings(workers: int) -> SimpleNamespace:
    return SimpleNamespace(num_workers=workers, pin_memory=True, prefetch_factor=2,
                           persistent_workers=workers > 0)


def sampler(rank: int = 0) -> BalancedBatchSampler:
    # 20 samples, global batch 6: 3 steps per epoch (2 samples left out), 2 ranks x micro 1 x accumulation 3
    return BalancedBatchSampler(list(range(10, 30)), micro_batch_size=1, world_size=2, rank=rank,
                                global_batch_size=6, seed=7)


def planned(s: BalancedBatchSampler, epoch: int, first_step: int = 0) -> list[list[int]]:
    return list(s.micro_batches(epoch, first_step))


@pytest.mark.parametrize("workers", [0, 2])
def test_the_feed_walks_epochs_ahead_of_training_and_leaves_the_trained_position_alone(workers):
    s = sampler(rank=1)
    feed = LoaderFeed(Items(), s, collate, loader_settings(workers), CPU)
    per_epoch = s.steps_per_epoch * s.accumulation
    got = [next(feed)["index"].tolist() for _ in range(3 * per_epoch + 2)]  # into a fourth epoch
    feed.close()
    expected = planned(s, 0) + planned(s, 1) + planned(s, 2) + planned(s, 3)[:2]
    assert got == expected
    assert planned(s, 0) != planned(s, 1)  # epochs differ, so a repeated epoch would show
    assert (s.epoch, s.step_in_epoch) == (0, 0)  # what a checkpoint saves moves only with training


def test_the_feed_starts_where_a_resumed_sampler_stands():
    s = sampler()
    s.load_state_dict(dict(s.state_dict(), epoch=2, step_in_epoch=1))
    feed = LoaderFeed(Items(), s, collate, loader_settings(0), CPU)
    first = [next(feed)["index"].tolist() for _ in range(2 * s.accumulation)]
    feed.close()
    assert first == planned(s, 2, first_step=1)[: 2 * s.accumulation]
    # a checkpoint taken after an epoch's last step: the feed goes on with the next epoch
    s.load_state_dict(dict(s.state_dict(), epoch=2, step_in_epoch=s.steps_per_epoch))
    feed = LoaderFeed(Items(), s, collate, loader_settings(0), CPU)
    assert next(feed)["index"].tolist() == planned(s, 3)[0]
    feed.close()


def test_prefetched_feed_with_workers_shuts_its_workers_down():
    s = sampler()
    feed = LoaderFeed(Items(), s, collate, loader_settings(2), CPU)
    workers = list(feed._iterator._workers)
    prefetcher = BatchPrefetcher(feed, CPU, 2)
    assert [next(prefetcher)[0]["index"].tolist() for _ in range(4)] == planned(s, 0)[:4]
    prefetcher.close()
    assert workers and not any(worker.is_alive() for worker in workers)
