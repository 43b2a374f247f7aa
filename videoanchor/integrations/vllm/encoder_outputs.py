"""The encoder outputs made ahead of a request's step (:class:`EncodedOutputs`): a held
request's items encoded with the model's own encoder (:func:`model_encoder`) for its SSC on
a side thread, and kept for the request's own prefill step, which takes them
(:meth:`EncodedOutputs.take`) instead of encoding the items a second time.
"""

from __future__ import annotations

import logging
import threading

import torch

from videoanchor.integrations.vllm.scoring import projector_only

logger = logging.getLogger("videoanchor.vllm")

__all__ = ["KEEP_ENCODED_BYTES", "EncodedOutputs", "model_encoder"]

#: Bytes of encoder outputs kept from the encoding ahead for the request's own prefill step
#: (per worker process); beyond it the step encodes its items again.
KEEP_ENCODED_BYTES = 1 << 30


def model_encoder(runner, features):
    """:data:`.scoring.EncoderOutputs` over ``features`` with the model's own encoder
    (vLLM's grouping into batches by modality), outside the runner's encoder cache: the
    side worker's default ``encoder``."""
    from vllm.multimodal.utils import group_and_batch_mm_kwargs

    def encoder_outputs(req_id: str, indices: list[int]) -> list:
        kwargs = [(features[i].modality, features[i].data) for i in indices]
        outs: list = []
        for _, _, batch in group_and_batch_mm_kwargs(kwargs, device=runner.device,
                                                     pin_memory=False):  # fmt: skip
            outs.extend(runner.model.embed_multimodal(**batch))
        return outs

    return encoder_outputs


class EncodedOutputs:
    """The encoder outputs of the items encoded ahead (by item identifier, as the model
    returned them), until the step that encodes the item takes them (:meth:`take`), at most
    :attr:`keep_bytes` of them (default :data:`KEEP_ENCODED_BYTES`; beyond it a step encodes
    its items again). Thread-safe."""

    def __init__(self, keep_bytes: int = KEEP_ENCODED_BYTES):
        self.keep_bytes = keep_bytes
        self._lock = threading.Lock()
        self._outs: dict[str, torch.Tensor] = {}
        self._by_req: dict[str, list[str]] = {}

    def encode(self, encoder, runner, features, items, req_id, stream=None):
        """The projector outputs of ``items`` (``encoder(runner, features)``, the model's own
        encoder as the step runs it, outside the runner's encoder cache), ready for a side
        thread on ``stream`` (None: the CPU, or the current stream); None if it failed. The
        model's outputs per item are kept for ``req_id``'s prefill step."""
        raw, kept = encoder(runner, features), {}

        def recording(rid, indices):  # the model's outputs, kept for the prefill step
            outs = raw(rid, indices)
            kept.update((features[i].identifier, o) for i, o in zip(indices, outs, strict=True))
            return outs

        try:
            with torch.inference_mode():
                enc = projector_only(recording, runner.model_config.hf_config)
                outs = enc(req_id, items)
            self.keep(req_id, kept)
            if stream is not None:  # the side stream reads what the step's stream wrote
                event = torch.cuda.Event()
                event.record()
                stream.wait_event(event)
                for t in outs:
                    t.record_stream(stream)
            return outs
        except Exception as err:
            logger.warning(
                "videoanchor: request %s: encoding its items ahead of its step failed (%s: "
                "%s); its step scores it instead", req_id, type(err).__name__, err,
            )  # fmt: skip
            return None

    def keep(self, req_id: str, outs: dict) -> None:
        """Keep ``outs`` (item identifier -> encoder output) for ``req_id``'s prefill step,
        within :attr:`keep_bytes`."""
        with self._lock:
            used = sum(t.numel() * t.element_size() for t in self._outs.values())
            for ident, out in outs.items():
                size = out.numel() * out.element_size()
                if ident in self._outs or used + size > self.keep_bytes:
                    continue
                self._outs[ident] = out
                used += size
                self._by_req.setdefault(req_id, []).append(ident)

    def take(self, identifier: str):
        """The encoder output of the item ``identifier`` if it was encoded ahead (and not
        taken yet), else None; handed out once."""
        with self._lock:
            return self._outs.pop(identifier, None)

    def drop(self, req_id: str) -> None:
        """Forget the outputs kept for ``req_id`` (those no other request kept too)."""
        with self._lock:
            idents = self._by_req.pop(req_id, ())
            still = {i for other in self._by_req.values() for i in other}
            for ident in idents:
                if ident not in still:
                    self._outs.pop(ident, None)
