"""The coordinator's rounds, one module per job.

* :mod:`~coordinator.rounds.settings` — :class:`RoundSettings`, :class:`ModelSpec`, names;
* :mod:`~coordinator.rounds.loop` — :class:`Coordinator`: wiring and the round loop;
* :mod:`~coordinator.rounds.state` — the open round the loop and the intake share;
* :mod:`~coordinator.rounds.inbound` — sender, enrollment and refusals for every handler;
* :mod:`~coordinator.rounds.intake` / :mod:`~coordinator.rounds.admission` — update chunks
  in, per-agent reassembly, sync and async admission, acknowledgements;
* :mod:`~coordinator.rounds.tasks` — tasks to the agents;
* :mod:`~coordinator.rounds.downloads` — model and artifact downloads;
* :mod:`~coordinator.rounds.reports` — reported shadows and events;
* :mod:`~coordinator.rounds.publishing` — manifest, export, signing, desired shadows;
* :mod:`~coordinator.rounds.aggregation` — closing a round (or failing it).
"""

from __future__ import annotations

from coordinator.rounds.aggregation import client_privacy
from coordinator.rounds.intake import rejection_ack
from coordinator.rounds.loop import Coordinator
from coordinator.rounds.publishing import Calibrator, Evaluator, Exporter, ModelPublisher
from coordinator.rounds.settings import ModelSpec, RoundSettings, round_training, version_name

__all__ = [
    "Calibrator",
    "Coordinator",
    "Evaluator",
    "Exporter",
    "ModelPublisher",
    "ModelSpec",
    "RoundSettings",
    "client_privacy",
    "rejection_ack",
    "round_training",
    "version_name",
]
