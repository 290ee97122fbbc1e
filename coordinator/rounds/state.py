"""The round being collected, as the round loop and the update intake share it.

:class:`OpenRound` holds one lock (a condition the loop waits on and the intake notifies), the
open round and its task, the base model updates are checked against, a small cache of older
bases (async updates trained from them still count) and the agents whose update was accepted
(their tensors stay in the blob store: the round closer streams them to the strategy). :meth:`OpenRound.discounted` is FedBuff's staleness discount.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from coordinator.aggregate import staleness_discounted
from coordinator.model_repo import ModelRepository
from protocol.codec import Tensors, TensorSpec


@dataclass(frozen=True)
class RoundTask:
    """The task of a round: which round, trained from which model, until when."""

    round_id: int
    base_version: str
    deadline: float


class OpenRound:
    """Shared state of the round being collected; hold ``lock`` to read or change it."""

    def __init__(self, repo: ModelRepository, *, max_staleness: int, staleness_exponent: float) -> None:
        self.repo = repo
        self.max_staleness, self.staleness_exponent = max_staleness, staleness_exponent
        self.lock = threading.Condition()
        self.task: RoundTask | None = None  # the round being collected, None between rounds
        self.base_version: str | None = None
        self.base: Tensors | None = None
        self.specs: list[TensorSpec] = []
        self.accepted: set[str] = set()  # agents whose update is in (frames in the blob store)
        self._older: OrderedDict[str, Tensors] = OrderedDict()

    @property
    def round_id(self) -> int | None:
        """The round being collected, if any."""
        return self.task.round_id if self.task is not None else None

    def load_base(self, version: str) -> None:
        """Check updates against ``version`` from now on."""
        self.base_version = version
        self.base = self.repo.tensors(version)
        self.specs = [TensorSpec(k, tuple(v.shape)) for k, v in self.base.items()]

    def tensors_of(self, version: str) -> Tensors:
        """The weights of ``version``: the base, or an older model kept for stale updates."""
        if version == self.base_version and self.base is not None:
            return self.base
        if version not in self._older:
            self._older[version] = self.repo.tensors(version)
            while len(self._older) > self.max_staleness + 1:
                self._older.popitem(last=False)
        return self._older[version]

    def discounted(self, tensors: Tensors, trained_from: Tensors, staleness: int) -> Tensors:
        """A stale update as a client model on the current base.

        ``base + s * (client - its base)`` with ``s = (1 + staleness) ** -exponent`` (FedBuff);
        a fresh update is returned unchanged.
        """
        if staleness == 0:
            return tensors
        assert self.base is not None
        return staleness_discounted(tensors, trained_from, self.base, staleness, self.staleness_exponent)
