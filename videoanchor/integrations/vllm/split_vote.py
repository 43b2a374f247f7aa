"""How the tensor-parallel ranks share the SSC of the requests scored ahead
(:class:`SplitVote`): without ``scores_ahead_split`` one rank per request scores it
(:meth:`SplitVote.owner_of`) and the engine core relays its scores to the others; with it,
every rank runs every request's SSC together, its columns split over a gloo group of their
own (:meth:`SplitVote.group`), after one small vote that keeps the ranks' jobs in step
(:meth:`SplitVote.vote`), and stops splitting for good once they are not
(:meth:`SplitVote.stop`).
"""

from __future__ import annotations

import hashlib
import logging

import torch

from videoanchor.integrations.vllm.scoring import check_outputs

logger = logging.getLogger("videoanchor.vllm")

__all__ = ["SplitVote", "communication_failed", "job_tag", "tp_rank_world"]


def communication_failed(err: BaseException) -> bool:
    """Whether ``err`` is a failure of a collective itself (a peer gone, a timeout), after
    which the ranks' collectives may be out of step: torch's ``DistError``, or gloo's own
    errors, which reach Python as a plain ``RuntimeError`` ("[.../gloo/transport/tcp/
    pair.cc] Connection closed by peer"). The solver's own errors (bad input, memory, a
    non-finite residual, a failed factorisation) reach every rank together and are not."""
    import torch.distributed as dist

    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and "gloo" in str(err).lower()
    )


def job_tag(key) -> int:
    """A 20-bit tag of a score key, the same in every process (not ``hash()``, which Python
    salts per process): what the split vote compares across ranks."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0xFFFFF


def tp_rank_world() -> tuple[int, int]:
    """This worker's tensor-parallel rank and the group's size ((0, 1) outside one)."""
    try:
        from vllm.distributed import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except Exception:  # no model-parallel group (tests building a runner by hand)
        return 0, 1


class SplitVote:
    """One worker's place among the tensor-parallel ranks: ``rank`` of ``world``;
    ``split`` (``scores_ahead_split``, only with ``world > 1``): the fast solver's columns
    split over the ranks, over ``group`` (None: a gloo group of vLLM's tensor-parallel ranks,
    made at the first split job: :meth:`group`). :attr:`broken`: set once the ranks' split
    jobs were found out of step (or the group failed); no split job runs a collective after
    it, and their requests are scored in their steps."""

    def __init__(self, rank: int, world: int, split: bool = False, group=None):
        self.rank, self.world = rank, world
        self.split = bool(split) and world > 1
        self._group = group  # None: not made yet; False: cannot be made here
        self.broken = False

    def owner_of(self, key: str) -> int:
        """The tensor-parallel rank that scores ``key`` (the others take its scores)."""
        return int(key[:8], 16) % self.world

    def group(self):
        """The gloo group of the tensor-parallel ranks that split SSC jobs (None: no split).
        Made at the first split job, in the main thread: ``new_group`` is collective, and
        every rank reaches it at the same submission. Its own group, so that the side
        thread's collectives never interleave with the steps' on vLLM's groups; gloo, so
        that on GPUs it never runs a second NCCL communicator beside the steps' all-reduces
        (its tensors pass through host memory)."""
        if not self.split:
            return None
        if self._group is None:
            import torch.distributed as dist

            self._group = False
            try:
                from vllm.distributed import get_tp_group

                ranks = list(get_tp_group().ranks)
                # new_group needs every process of the default group; vLLM's other
                # parallel groups (pipeline, data, expert) would have to join it too
                if dist.is_initialized() and dist.get_world_size() == len(ranks):
                    self._group = dist.new_group(ranks=ranks, backend="gloo")
            except Exception as err:
                logger.warning("videoanchor: scores_ahead_split: no process group (%s: %s)",
                               type(err).__name__, err)  # fmt: skip
            if self._group is False:
                logger.warning(
                    "videoanchor: scores_ahead_split is set but this engine's workers are not "
                    "one tensor-parallel group alone; each request is scored on one rank"
                )  # fmt: skip
        return self._group or None

    def vote(self, req, p, cache, outs, group, wanted: bool) -> tuple[bool, object]:
        """Whether every rank of ``group`` runs the split job of ``p.key`` (``(True,
        None)``), or its result without an SSC (``(False, scores or None)``): one small
        collective, the same answer on every rank. ``wanted``: whether this rank still has
        a request that wants the job's scores.

        Every rank runs every split job, in submission order (one side thread per rank, the
        same submissions on every rank), and no rank skips a job another runs. The job runs
        if any rank still wants its scores (a request forgotten on one rank may still be
        wanted on another, whose main thread has not seen it go yet), returns the cached
        scores where every rank holds them, and leaves the request to its step where any
        rank's encoder failed or gave outputs of the wrong shape (checked before the vote:
        no rank fails alone inside the SSC)."""
        from videoanchor.anchor.collective import all_sum

        # nothing before the vote may raise: a rank that left here without voting would
        # leave the others' vote to pair with its next job's
        try:
            cached = cache.get(p.key) if cache is not None else None
        except Exception as err:
            cached = None
            logger.warning("videoanchor: score cache lookup failed (%s: %s)",
                           type(err).__name__, err)  # fmt: skip
        encoded = outs is not None
        if encoded:
            try:
                check_outputs(req, p.items, p.cols, outs)
            except Exception as err:
                encoded = False
                logger.warning("%s; its step scores it instead", err)
        # the job's tag and its square: every rank votes on the same job iff
        # world * sum(tag^2) == sum(tag)^2 (exact in int64 for tags under 2^20)
        tag = job_tag(p.key)
        votes = [int(wanted), int(encoded), int(cached is not None), tag, tag * tag]
        wanted_any, all_encoded, all_cached, tags, squares = (
            int(v) for v in all_sum(torch.tensor(votes, dtype=torch.int64), group)
        )  # fmt: skip
        if self.world * squares != tags * tags:
            self.stop(f"the ranks voted on different jobs (this rank: {req.req_id})")
            return False, None
        if not wanted_any:
            return False, None
        if all_cached == self.world:
            return False, cached
        if all_encoded < self.world:
            return False, None
        return True, None

    def stop(self, why: str) -> None:
        """Stop running collectives in split jobs for good: the ranks' jobs (or their group)
        are out of step, and a collective could pair with another request's. Every later
        split job leaves its request to its step (which scores it correctly on every rank)."""
        if not self.broken:
            self.broken = True
            logger.error(
                "videoanchor: scores_ahead_split: %s; split jobs stop here and their requests "
                "are scored in their steps", why,
            )  # fmt: skip
