"""Downloads: model weights and inference artifacts, chunked to the agent that asks.

:class:`DownloadServer` answers ``agents/{agent}/model_request``: a version's weights as a frame
(a delta from the version the box holds when it names one it has; the last few frames are
cached), or one artifact its manifest lists; all chunks, or only those the request names as
missing when it resumes the very same transfer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from coordinator.model_repo import ModelRepository
from coordinator.rounds.inbound import Inbound
from protocol.chunks import split
from protocol.codec.patch import patch_encode
from protocol.errors import FedscanError, MalformedMessage, Reason
from protocol.frame import encode_model
from protocol.messages import ModelRequest, parse_message
from protocol.topics import Topics
from protocol.transfers import artifact_transfer, model_transfer
from protocol.transport import Transport

#: Encoded model frames and artifact patches kept, keyed by (version, version the box has, artifact).
FRAME_CACHE: Final = 16


class DownloadServer:
    """The ``model_request`` handler."""

    def __init__(self, *, repo: ModelRepository, transport: Transport, topics: Topics, inbound: Inbound,
                 chunk_bytes: int) -> None:
        self.repo, self.transport, self.topics, self.inbound = repo, transport, topics, inbound
        self.chunk_bytes = chunk_bytes
        self._frames: OrderedDict[tuple[str, str | None, str | None], bytes] = OrderedDict()

    def on_model_request(self, topic: str, payload: bytes) -> None:
        """One request on ``agents/{agent}/model_request``."""
        sender = self.inbound.sender(topic, "model_request")
        if sender is None:
            return
        agent, _ = sender
        if self.inbound.enrolled(agent, "model_request") is not None:
            return
        try:
            req = parse_message(ModelRequest, payload)
        except MalformedMessage as exc:
            self.inbound.reject("model_request", agent, None, exc)
            return
        if not self.repo.has(req.version):
            self.inbound.reject("model_request", agent, None, FedscanError(f"no model {req.version}",
                                                                            reason=Reason.UNKNOWN_VERSION))
            return
        if req.artifact is not None:
            self._send_artifact(agent, req)
            return
        have = req.have if req.have and req.have != req.version and self.repo.has(req.have) else None
        self._send(agent, req, self._frame(req.version, have), model_transfer(req.version, have))

    def _cached(self, key: tuple[str, str | None, str | None], make: Callable[[], bytes]) -> bytes:
        data = self._frames.get(key)
        if data is None:
            data = self._frames[key] = make()
            while len(self._frames) > FRAME_CACHE:
                self._frames.popitem(last=False)
        return data

    def _frame(self, version: str, have: str | None) -> bytes:
        """The weights of ``version`` for a box holding ``have``: its step, an XOR delta, or whole."""
        if have is not None and self.repo.manifest(version).parent == have:
            step = self.repo.step_frame(version)
            if step is not None:
                return step

        def make() -> bytes:
            base = self.repo.tensors(have) if have else None
            return encode_model(self.repo.tensors(version), version=version, base=base, base_version=have)

        return self._cached((version, have, None), make)

    def _send_artifact(self, agent: str, req: ModelRequest) -> None:
        uri = req.artifact
        assert uri is not None
        vb = self.repo.manifest(req.version).validation_batch
        try:
            data = (self.repo.validation_batch_bytes(req.version) if vb is not None and uri == vb.uri
                    else self.repo.artifact_bytes(req.version, uri))
        except (KeyError, OSError, ValueError) as exc:
            self.inbound.reject("model_request", agent, None, FedscanError(str(exc), reason=Reason.UNKNOWN_ARTIFACT))
            return
        if req.have is None:  # v1: the artifact as it is
            self._send(agent, req, data, artifact_transfer(req.version, uri, None))
            return
        have = req.have

        def make() -> bytes:
            try:  # the same artifact of the version the box holds, else none: the patch is then the whole file
                base = self.repo.artifact_bytes(have, uri) if self.repo.has(have) else None
            except (KeyError, OSError, ValueError):
                base = None
            return patch_encode(data, base)

        self._send(agent, req, self._cached((req.version, have, uri), make), artifact_transfer(req.version, uri, have))

    def _send(self, agent: str, req: ModelRequest, data: bytes, transfer: str) -> None:
        """Chunks of ``data`` on the agent's download topic: all, or those a resumed request names."""
        wanted = set(req.missing) if req.missing is not None and req.transfer_id == transfer else None
        for i, c in enumerate(split(data, transfer, self.chunk_bytes)):
            if wanted is None or i in wanted:
                self.transport.publish(self.topics.downloads(agent), c)
