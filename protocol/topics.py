"""Every MQTT topic string of protocol v1 is built (and parsed) here, and nowhere else.

Tree, all under ``fedscan/v1/{fleet}/``::

    agents/{agent}/status            retained  online/offline (Last Will)          agent -> all
    agents/{agent}/telemetry         QoS 0     resource sample                     agent -> coordinator
    agents/{agent}/shadow/desired    retained  model version the box should serve  coordinator -> agent
    agents/{agent}/shadow/reported   retained  model version the box does serve    agent -> coordinator
    agents/{agent}/tasks             QoS 1     round task for this agent only      coordinator -> agent
    agents/{agent}/acks              QoS 1     update ack / missing chunks         coordinator -> agent
    agents/{agent}/updates/{round}   QoS 1     update chunks                       agent -> coordinator
    agents/{agent}/models/request    QoS 1     ask for (missing chunks of) a model agent -> coordinator
    agents/{agent}/events            QoS 1     install results, refusals           agent -> coordinator
    agents/{agent}/downloads         QoS 1     model chunks sent on request        coordinator -> agent
    models/{version}/manifest        retained  signed model manifest               coordinator -> all
    models/{version}/chunks          QoS 1     model artifact chunks               coordinator -> all
    coordinator/status               retained  online/offline (Last Will)          coordinator -> all

Agent ids and versions are identifiers (``protocol.identifiers``: 1-64 of ``[A-Za-z0-9_.-]``, not
``.`` or ``..``) so that they can never contain MQTT wildcards or separators, and so that a broker
ACL pattern (``%c`` = client id) can pin each agent to its own subtree.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from protocol.errors import UnknownTopic
from protocol.identifiers import validate_id

ROOT = "fedscan/v1"


class Kind(StrEnum):
    """The kinds of topic in the v1 tree (the path after the agent or model part)."""

    STATUS = "status"
    TELEMETRY = "telemetry"
    SHADOW_DESIRED = "shadow/desired"
    SHADOW_REPORTED = "shadow/reported"
    TASKS = "tasks"
    ACKS = "acks"
    UPDATES = "updates"
    MODEL_REQUEST = "models/request"
    EVENTS = "events"
    DOWNLOADS = "downloads"
    MODEL_MANIFEST = "manifest"
    MODEL_CHUNKS = "chunks"
    COORDINATOR_STATUS = "coordinator/status"


@dataclass(frozen=True)
class ParsedTopic:
    """A topic taken apart: its fleet, kind and the agent, version or round it names."""

    fleet: str
    kind: Kind
    agent: str | None = None
    version: str | None = None
    round_id: int | None = None


@dataclass(frozen=True)
class Topics:
    """Topic builder for one fleet."""

    fleet: str = "default"

    def __post_init__(self) -> None:
        validate_id(self.fleet, "fleet")

    @property
    def prefix(self) -> str:
        """``fedscan/v1/{fleet}``."""
        return f"{ROOT}/{self.fleet}"

    # -- per agent ---------------------------------------------------------------
    def agent(self, agent: str, kind: Kind, round_id: int | None = None) -> str:
        """The topic of ``kind`` for ``agent`` (``round_id`` for updates)."""
        validate_id(agent, "agent id")
        base = f"{self.prefix}/agents/{agent}/{kind.value}"
        if kind is Kind.UPDATES:
            if round_id is None or round_id < 0:
                raise ValueError("updates topic needs a round id >= 0")
            return f"{base}/{round_id}"
        return base

    def status(self, agent: str) -> str:
        """Retained presence of an agent."""
        return self.agent(agent, Kind.STATUS)

    def telemetry(self, agent: str) -> str:
        """An agent's resource samples."""
        return self.agent(agent, Kind.TELEMETRY)

    def shadow_desired(self, agent: str) -> str:
        """The version an agent should serve (retained)."""
        return self.agent(agent, Kind.SHADOW_DESIRED)

    def shadow_reported(self, agent: str) -> str:
        """The version an agent serves (retained)."""
        return self.agent(agent, Kind.SHADOW_REPORTED)

    def tasks(self, agent: str) -> str:
        """Round tasks for one agent."""
        return self.agent(agent, Kind.TASKS)

    def acks(self, agent: str) -> str:
        """Update acknowledgements for one agent."""
        return self.agent(agent, Kind.ACKS)

    def updates(self, agent: str, round_id: int) -> str:
        """One agent's update chunks for one round."""
        return self.agent(agent, Kind.UPDATES, round_id)

    def model_request(self, agent: str) -> str:
        """An agent's model and chunk requests."""
        return self.agent(agent, Kind.MODEL_REQUEST)

    def events(self, agent: str) -> str:
        """An agent's events for the record."""
        return self.agent(agent, Kind.EVENTS)

    def downloads(self, agent: str) -> str:
        """Model chunks sent to one agent on request."""
        return self.agent(agent, Kind.DOWNLOADS)

    # -- models and coordinator ------------------------------------------------------
    def model_manifest(self, version: str) -> str:
        """The retained manifest of a model version."""
        return f"{self.prefix}/models/{validate_id(version, 'version')}/manifest"

    def model_chunks(self, version: str) -> str:
        """Broadcast artifact chunks of a model version."""
        return f"{self.prefix}/models/{validate_id(version, 'version')}/chunks"

    def coordinator_status(self) -> str:
        """Retained presence of the coordinator."""
        return f"{self.prefix}/coordinator/status"

    # -- subscriptions -----------------------------------------------------------------
    def all_agents(self, kind: Kind) -> str:
        """Wildcard filter for one kind of agent topic, for the coordinator."""
        suffix = f"{kind.value}/+" if kind is Kind.UPDATES else kind.value
        return f"{self.prefix}/agents/+/{suffix}"

    def all_model_manifests(self) -> str:
        """Wildcard filter for every model manifest."""
        return f"{self.prefix}/models/+/manifest"

    def all_model_chunks(self) -> str:
        """Wildcard filter for every model's chunks."""
        return f"{self.prefix}/models/+/chunks"

    # -- parsing -------------------------------------------------------------------------
    def parse(self, topic: str) -> ParsedTopic:
        """Parse a topic of this fleet; raise ``UnknownTopic`` for anything outside the tree."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise UnknownTopic(f"topic {topic!r} is not under {head!r}")
        parts = topic[len(head) :].split("/")
        try:
            if parts[0] == "agents" and len(parts) >= 3:
                agent = validate_id(parts[1], "agent id")
                rest = "/".join(parts[2:])
                if parts[2] == Kind.UPDATES.value and len(parts) == 4:
                    if not parts[3].isdigit():
                        raise UnknownTopic(f"round id {parts[3]!r} is not a number")
                    return ParsedTopic(self.fleet, Kind.UPDATES, agent=agent, round_id=int(parts[3]))
                for kind in Kind:
                    if kind.value == rest and kind not in (
                        Kind.UPDATES,
                        Kind.MODEL_MANIFEST,
                        Kind.MODEL_CHUNKS,
                        Kind.COORDINATOR_STATUS,
                    ):
                        return ParsedTopic(self.fleet, kind, agent=agent)
            elif parts[0] == "models" and len(parts) == 3:
                version = validate_id(parts[1], "version")
                if parts[2] == "manifest":
                    return ParsedTopic(self.fleet, Kind.MODEL_MANIFEST, version=version)
                if parts[2] == "chunks":
                    return ParsedTopic(self.fleet, Kind.MODEL_CHUNKS, version=version)
            elif parts == ["coordinator", "status"]:
                return ParsedTopic(self.fleet, Kind.COORDINATOR_STATUS)
        except UnknownTopic as exc:
            raise UnknownTopic(f"topic {topic!r}: {exc}") from exc
        raise UnknownTopic(f"topic {topic!r} is not part of protocol v1")
