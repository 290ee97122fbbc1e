"""Which model-signing keys this box trusts, and the start-up rule that it trusts some.

Every model the agent installs or (re-)activates, and every rollback order it obeys, is verified
against the trust store given with ``--trust`` (the coordinator's ``keys/trust.json``, provisioned
to the box). :class:`TrustSource` re-reads the file when it changes, so a key retired by a newly
provisioned file stops being trusted at the next activation, without a restart; a file that
becomes unreadable refuses every model (fail closed).

Without a trust store the agent refuses to start. ``--insecure-unsigned-models`` lets it start
without one (nothing is verified), and is itself refused outside ``FEDSCAN_ENV=development``.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from protocol.errors import FedscanError, Reason
from protocol.signing import SignatureError, TrustStore

log = logging.getLogger("fedscan.agent.trust")

DEVELOPMENT = "development"


class TrustConfigError(FedscanError, ValueError):
    """The agent's trust settings are unsafe or inconsistent: it refuses to start (exit 2)."""

    reason = Reason.BAD_CONFIG


class TrustSource:
    """A trust store file, re-read whenever it changes on disk."""

    def __init__(self, path: Path) -> None:
        """Read the trust store at ``path`` now (a missing or unreadable file refuses the start)."""
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._store = TrustStore()
        self.current()  # a missing or unreadable file refuses the start, not the first model

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise SignatureError(f"cannot read trust store {self.path}: {exc}", reason=Reason.BAD_TRUST_STORE) from exc
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def current(self) -> TrustStore:
        """Return the trust store as the file holds it now (raises ``SignatureError`` when unreadable)."""
        with self._lock:
            stamp = self._stat()
            if stamp != self._stamp:
                store = TrustStore.load(self.path)
                if self._stamp is not None:
                    log.info("trust store %s changed: %d trusted, %d retired keys", self.path, len(store.keys),
                             len(store.retired))
                self._store, self._stamp = store, stamp
            return self._store


def trust_for_agent(path: Path | None, *, insecure_unsigned_models: bool, environment: str) -> TrustSource | None:
    """Return the agent's trust source, or ``None`` for the explicit development-only insecure mode.

    Raises :class:`TrustConfigError` when there is no trust store and no insecure flag, when the
    insecure flag is given outside ``FEDSCAN_ENV=development``, or when both are given.
    """
    if insecure_unsigned_models:
        if path is not None:
            raise TrustConfigError("--trust and --insecure-unsigned-models contradict each other")
        if environment != DEVELOPMENT:
            raise TrustConfigError("--insecure-unsigned-models is refused outside FEDSCAN_ENV=development")
        log.warning("INSECURE: model signatures are not checked (--insecure-unsigned-models, development only)")
        return None
    if path is None:
        raise TrustConfigError("no trust store: give --trust <coordinator state>/keys/trust.json (models are "
                               "verified against it); --insecure-unsigned-models exists for development only")
    try:
        return TrustSource(path)
    except SignatureError as exc:
        raise TrustConfigError(str(exc)) from exc
