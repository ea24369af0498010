"""Round numbers of a run that continues from a checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result
from flwr.supercore import log

from fedqsn_flwr.flower.strategies.utils import shifted_result

#: Flower's server-side evaluation: (round, global arrays) -> metrics.
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
#: Flower's round loop for a number of rounds and an evaluate function.
RoundLoop = Callable[[int, EvaluateFn | None], Result]


class Resumption:
    """Which rounds a restored run has finished, and Flower's round numbers shifted past them.

    Flower's loop always counts rounds from 1; a run resumed after round ``n``
    runs Flower's rounds ``1 .. num_rounds - n`` and :meth:`real` turns each
    into the run's own round number.
    """

    def __init__(self) -> None:
        #: Rounds a restored checkpoint had finished.
        self.completed = 0
        #: The last round whose evaluation was aggregated (Flower's loop calls
        #: aggregate_evaluate every round, even with nothing to evaluate).
        self.last = 0
        self._restored = False
        self._offset = 0  # added to Flower's round numbers while a resumed run goes

    def real(self, server_round: int) -> int:
        """The run's number of Flower's round ``server_round``."""
        return server_round + self._offset

    def restore(self, completed: int) -> None:
        """The next :meth:`start` continues after round ``completed``."""
        self.completed = self.last = completed
        self._restored = True

    def start(
        self,
        loop: RoundLoop,
        initial_arrays: ArrayRecord,
        *,
        num_rounds: int,
        evaluate_fn: EvaluateFn | None,
    ) -> Result:
        """Run ``loop`` for the rounds left; its :class:`Result` in the run's round numbers.

        The restored model is not evaluated again (round 0 of a resumed loop).
        """
        if not self._restored:
            return loop(num_rounds, evaluate_fn)
        offset = self.completed
        if offset >= num_rounds:
            log(INFO, "All %d rounds were finished before; nothing to resume", num_rounds)
            return Result(arrays=initial_arrays)
        log(
            INFO,
            "Resuming after round %d: Flower's rounds 1..%d below are rounds %d..%d",
            offset,
            num_rounds - offset,
            offset + 1,
            num_rounds,
        )

        def shifted_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0 or evaluate_fn is None:
                return None  # evaluated when its round finished
            return evaluate_fn(server_round + offset, arrays)

        self._offset = offset
        try:
            result = loop(num_rounds - offset, shifted_evaluate if evaluate_fn else None)
        finally:
            self._offset = 0
            self._restored = False  # a later start() begins a new run
        return shifted_result(result, offset)
