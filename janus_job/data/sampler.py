"""Token-balanced distributed sampling with exact, world-size-independent resume.

An epoch is a deterministic permutation of the dataset (seed, epoch). It is consumed in *global
batches* of G = micro_batch_size x gradient_accumulation_steps x world_size samples, one global
batch per optimizer step, remainder dropped. Which samples form optimizer step s depends only on
(seed, epoch, s, G), never on the world size, so a job resized from W to W' ranks (same G, with
accumulation G / (micro x W')) trains exactly the same samples per step; only the assignment of
those samples to (micro-step, rank) changes.

Inside a global batch, `BalancedBatchSampler` fills the accum x world micro-batches (each exactly
`micro_batch_size` samples) longest-processing-time first, so every micro-batch carries about the
same number of tokens (text + visual), then deals the micro-batches to ranks so that every rank's
total over the optimizer step is about equal as well. `LengthGroupedBatchSampler` reproduces
JanusVLN's length-grouped order on the same global batches, for comparison.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence

import numpy as np

from janus_job.errors import JobError

STATE_VERSION = 1

# plan[k][r] = dataset indices of the micro-batch that rank r trains at micro-step k.
Plan = list[list[list[int]]]


def gradient_accumulation_for(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """The accumulation that keeps `global_batch_size` at this world size, or a JobError."""
    per_micro_step = micro_batch_size * world_size
    if global_batch_size <= 0 or global_batch_size % per_micro_step != 0:
        raise JobError(
            f"global batch size {global_batch_size} is not a multiple of micro_batch_size x "
            f"world_size = {micro_batch_size} x {world_size} = {per_micro_step}; the job cannot keep "
            f"its global batch at this size. Pick a node count (or micro_batch_size) so that "
            f"{global_batch_size} / (micro_batch_size x world_size) is a whole number."
        )
    return global_batch_size // per_micro_step


class _GlobalBatchSampler:
    """Shared epoch/step bookkeeping; subclasses decide how one global batch is laid out."""

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        micro_batch_size: int,
        world_size: int,
        rank: int,
        global_batch_size: int,
        seed: int,
    ) -> None:
        if micro_batch_size < 1:
            raise JobError(f"training.micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise JobError(f"rank {rank} is outside world size {world_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or (self.lengths <= 0).any():
            raise JobError("every sample needs a positive token length (text + visual tokens)")
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.rank = rank
        self.global_batch_size = global_batch_size
        self.accumulation = gradient_accumulation_for(global_batch_size, micro_batch_size, world_size)
        self.seed = seed
        self.steps_per_epoch = len(self.lengths) // global_batch_size
        if self.steps_per_epoch == 0:
            raise JobError(
                f"the dataset has {len(self.lengths)} samples, fewer than one global batch "
                f"({global_batch_size}); add data or lower micro_batch_size / gradient_accumulation_steps"
            )
        self.epoch = 0
        self.step_in_epoch = 0

    # -- which samples ------------------------------------------------------------------------

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))

    def global_batch(self, epoch: int, step: int) -> list[int]:
        """Dataset indices of optimizer step `step` of `epoch`, in permutation order."""
        start = step * self.global_batch_size
        return self.permutation(epoch)[start : start + self.global_batch_size].tolist()

    def plan(self, epoch: int, step: int) -> Plan:
        raise NotImplementedError

    # -- position -----------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.step_in_epoch = 0

    def advance(self) -> None:
        """Marks one optimizer step as trained; call after `engine.step()` at the boundary."""
        self.step_in_epoch += 1

    @property
    def epoch_done(self) -> bool:
        return self.step_in_epoch >= self.steps_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's micro-batches from the current position to the end of the epoch.

        The iterator snapshots the position when it starts, so a DataLoader may prefetch ahead;
        the trained position is what `advance()` records.
        """
        return self.micro_batches(self.epoch, self.step_in_epoch)

    def micro_batches(self, epoch: int, first_step: int) -> Iterator[list[int]]:
        """This rank's micro-batches of `epoch` from optimizer step `first_step` to its end."""
        for step in range(first_step, self.steps_per_epoch):
            for micro_step in self.plan(epoch, step):
                yield micro_step[self.rank]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.step_in_epoch) * self.accumulation

    # -- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_batch_size": self.global_batch_size,
            "num_samples": len(self.lengths),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise JobError(f"sampler state version {state.get('version')!r} is not {STATE_VERSION}")
        if state["num_samples"] != len(self.lengths):
            raise JobError(
                f"the checkpoint was trained on {state['num_samples']} samples but the dataset now has "
                f"{len(self.lengths)}; exact resume needs the same dataset (start a new run to change it)"
            )
        if state["global_batch_size"] != self.global_batch_size:
            raise JobError(
                f"the checkpoint used global batch size {state['global_batch_size']} but this run uses "
                f"{self.global_batch_size}; resume keeps the global batch: set "
                f"training.global_batch_size: {state['global_batch_size']} in the spec"
            )
        if state["seed"] != self.seed:
            raise JobError(
                f"the checkpoint used training.seed={state['seed']} but the spec says {self.seed}; "
                f"exact resume needs the same seed"
            )
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])


class BalancedBatchSampler(_GlobalBatchSampler):
    """Per optimizer step, spreads the global batch so every rank gets about the same tokens."""

    def plan(self, epoch: int, step: int) -> Plan:
        batch = self.global_batch(epoch, step)
        bins = _fill_micro_batches(batch, self.lengths, self.accumulation * self.world_size, self.micro_batch_size)
        _even_out_by_swaps(bins, self.lengths)
        return _deal_to_ranks(bins, self.lengths, self.world_size)


def _fill_micro_batches(batch: list[int], lengths: np.ndarray, num_bins: int, bin_size: int) -> list[list[int]]:
    """Longest-processing-time first: each sample, longest first, joins the lightest open bin."""
    order = sorted(batch, key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    open_bins = [(0, b) for b in range(num_bins)]  # (load, bin id): ties go to the lowest id
    for index in order:
        load, b = heapq.heappop(open_bins)
        bins[b].append(index)
        if len(bins[b]) < bin_size:
            heapq.heappush(open_bins, (load + int(lengths[index]), b))
    return bins


def _even_out_by_swaps(bins: list[list[int]], lengths: np.ndarray, max_swaps: int = 512) -> None:
    """Improves the LPT fill in place: while some swap of one sample between the heaviest bin and
    another bin lowers the heavier of the two, make the swap that lowers it most (LPT alone is
    loose when bins hold several samples)."""
    load = [int(lengths[b].sum()) for b in bins]
    for _ in range(max_swaps):
        heavy = max(range(len(bins)), key=lambda b: (load[b], -b))
        best = None  # (new max of the pair, other bin, position in heavy, position in other)
        for other in range(len(bins)):
            gap = load[heavy] - load[other]
            if other == heavy or gap <= 0:
                continue
            for i, a in enumerate(bins[heavy]):
                for j, c in enumerate(bins[other]):
                    moved = int(lengths[a]) - int(lengths[c])
                    if 0 < moved < gap:
                        candidate = (max(load[heavy] - moved, load[other] + moved), other, i, j)
                        if best is None or candidate < best:
                            best = candidate
        if best is None:
            return
        _, other, i, j = best
        moved = int(lengths[bins[heavy][i]]) - int(lengths[bins[other][j]])
        bins[heavy][i], bins[other][j] = bins[other][j], bins[heavy][i]
        load[heavy] -= moved
        load[other] += moved


def _deal_to_ranks(bins: list[list[int]], lengths: np.ndarray, world_size: int) -> Plan:
    """Groups bins into micro-steps (heaviest together) and gives each micro-step's heaviest bin
    to the rank with the least load so far in this optimizer step."""
    load = [int(lengths[b].sum()) for b in bins]
    by_load = sorted(range(len(bins)), key=lambda b: (-load[b], b))
    rank_load = [0] * world_size
    plan: Plan = []
    for first in range(0, len(by_load), world_size):
        micro_step_bins = by_load[first : first + world_size]
        ranks = sorted(range(world_size), key=lambda r: (rank_load[r], r))
        row: list[list[int]] = [[] for _ in range(world_size)]
        for b, r in zip(micro_step_bins, ranks):
            row[r] = bins[b]
            rank_load[r] += load[b]
        plan.append(row)
    return plan


class LengthGroupedBatchSampler(_GlobalBatchSampler):
    """JanusVLN's length-grouped order, on the same global batches, for comparison.

    JanusVLN (Trainer patch in src/qwen_vl/train/sampler.py) builds megabatches of
    micro x (world x accum) samples, sorts each by length (longest first), cuts it into
    world x accum chunks of `micro` samples by greedily adding each sample to the lightest chunk
    that is not full, and concatenates the chunks. Its data loader then gives chunk j to micro-step
    j // world on rank j % world, so at micro batch 1 rank 0 receives the longest sample of every
    micro-step. Lengths here are the same token counts the balanced sampler sees (JanusVLN itself
    estimates them as words + 252 x images), which only flatters the baseline.
    """

    def plan(self, epoch: int, step: int) -> Plan:
        batch = self.global_batch(epoch, step)
        chunks = _even_chunks(sorted(batch, key=lambda i: (-int(self.lengths[i]), i)), self.lengths,
                              self.accumulation * self.world_size)
        w = self.world_size
        return [chunks[k * w : (k + 1) * w] for k in range(self.accumulation)]


def _even_chunks(ordered: list[int], lengths: np.ndarray, num_chunks: int) -> list[list[int]]:
    per_chunk = len(ordered) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    chunk_load = [0.0] * num_chunks
    for index in ordered:
        lightest = chunk_load.index(min(chunk_load))
        chunks[lightest].append(index)
        chunk_load[lightest] += int(lengths[index])
        if len(chunks[lightest]) == per_chunk:
            chunk_load[lightest] = float("inf")
    return chunks


def load_ratios(plan: Plan, lengths: Sequence[int]) -> tuple[float, float]:
    """(per-rank step load max/mean, sum over micro-steps of max / sum of mean) for one plan.

    The first is what a rank waits for when gradients are reduced once per optimizer step; the
    second when every micro-step synchronises (ZeRO-2/3 reduce gradients in every backward).
    """
    lengths = np.asarray(lengths)
    per_micro = np.array([[int(lengths[mb].sum()) for mb in row] for row in plan], dtype=np.float64)
    per_rank = per_micro.sum(axis=0)
    step_ratio = float(per_rank.max() / per_rank.mean())
    micro_ratio = float(per_micro.max(axis=1).sum() / per_micro.mean(axis=1).sum())
    return step_ratio, micro_ratio
