"""What a round's proxies reveal, measured from the messages once they are built.

The strategy builds its messages first and hands them here: nothing below
changes a message, and what is measured is what a client would decode.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from flwr.app import Message

from fedqsn_flwr.core.masking import MaskPolicy
from fedqsn_flwr.flower.privacy import ExposureTracker, SimilarityReference, unit_factors
from fedqsn_flwr.flower.protocol import LAYOUT_RECORD, PROXY_RECORD
from fedqsn_flwr.flower.proxy import PackedTensor, decode_proxy, iter_packed
from fedqsn_flwr.flower.strategies.utils import StateEvaluateFn, proxy_metrics


class PrivacyMonitor:
    """Similarity, exposure and proxy scores of the proxy messages of every round.

    Parameters
    ----------
    policy : MaskPolicy
        The strategy's mask policy (which tensors are masked).
    similarity : bool
        Measure each proxy's cosine similarity and relative L2 distance to the
        global model (in global units, averaged over the round's messages:
        ``cosine_all``, ``rel_l2_all``, ``cosine_masked``, ``rel_l2_masked``)
        and track the exposure (:class:`~fedqsn_flwr.flower.privacy.ExposureTracker`).
    evaluations : int
        Proxies per round that :meth:`train_round`'s ``evaluate_fn`` scores: the
        first ones (0: all).
    similarities : int
        Proxies per round compared with the global model: the first ones (0:
        all). The proxies of a round differ only by their client masks, and a
        comparison costs about one decode of the proxy: one per round keeps the
        figures and drops most of the cost. Exposure counts every message.

    """

    def __init__(
        self,
        policy: MaskPolicy,
        *,
        similarity: bool,
        evaluations: int,
        similarities: int = 0,
    ) -> None:
        self.policy = policy
        self.similarity = similarity
        self.evaluations = evaluations
        self.similarities = similarities
        self.exposure: ExposureTracker | None = None

    def train_round(
        self,
        global_state: Mapping[str, torch.Tensor],
        messages: list[Message],
        evaluate_fn: StateEvaluateFn | None = None,
    ) -> dict[str, float]:
        """The round_log values of a round's training messages (empty: nothing measured).

        ``evaluate_fn`` scores decoded proxies (``proxy_<name>``: the mean over
        those scored).
        """
        if not messages or (not self.similarity and evaluate_fn is None):
            return {}
        reference = None
        if self.similarity:
            reference = SimilarityReference(global_state, list(self.policy.unit_axes))
            if self.exposure is None:
                self.exposure = ExposureTracker(global_state, self.policy)
        sums: dict[str, float] = {}
        measured = 0
        scores: list[float | Mapping[str, float]] = []
        for message in messages:
            sent, layout = message.content[PROXY_RECORD], message.content[LAYOUT_RECORD]
            scored = evaluate_fn is not None and (
                not self.evaluations or len(scores) < self.evaluations
            )
            compared = reference is not None and (
                not self.similarities or measured < self.similarities
            )
            found: dict[str, float] = {}
            if scored:
                assert evaluate_fn is not None
                proxy = decode_proxy(sent, layout)
                scores.append(evaluate_fn(proxy.state))
                if reference is not None:
                    assert self.exposure is not None
                    self.exposure.add(proxy)
                    if compared:
                        found = reference(proxy.state, unit_factors(proxy))
            elif compared:
                assert reference is not None
                # straight from the codes, one tensor at a time: a large model's
                # proxy needs no decoded copy to be measured
                found = reference.compare_packed(
                    self._exposed(message), int(layout["bit-width"]), int(layout["block-size"])
                )
            elif self.exposure is not None:
                for _ in self._exposed(message):
                    pass
            measured += bool(found)
            for key, value in found.items():
                sums[key] = sums.get(key, 0.0) + value
        sims = {key: value / measured for key, value in sums.items()}
        values = dict(sims)
        if self.exposure is not None:
            values["exposure"] = self.exposure.exposure
        if scores:
            values.update(proxy_metrics(scores))
        return values

    def evaluate_round(self, messages: list[Message]) -> dict[str, float]:
        """The exposure after a round's evaluation messages (their units count as sent too)."""
        if not messages or self.exposure is None:
            return {}
        for message in messages:
            for _ in self._exposed(message):
                pass
        return {"exposure": self.exposure.exposure}

    def _exposed(self, message: Message) -> Iterator[PackedTensor]:
        """The message's tensors, still packed, each marked exposed as it comes by."""
        assert self.exposure is not None
        for piece in iter_packed(message.content[PROXY_RECORD], message.content[LAYOUT_RECORD]):
            self.exposure.add_tensor(piece.name, piece.axis, piece.units)
            yield piece
