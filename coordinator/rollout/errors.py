"""The error a refused rollout command raises, and how a refused manifest is named in it."""

from __future__ import annotations

from protocol.errors import FedscanError, Reason


class RolloutError(FedscanError):
    """A refused rollout command; ``reason`` says why and the store is unchanged."""

    reason = Reason.BAD_STATE


#: How a manifest the trust store refuses is named when a rollout is refused for it.
UNTRUSTED: dict[Reason, Reason] = {
    Reason.UNSIGNED: Reason.UNTRUSTED_UNSIGNED,
    Reason.UNKNOWN_KEY: Reason.UNTRUSTED_UNKNOWN_KEY,
    Reason.BAD_SIGNATURE: Reason.UNTRUSTED_BAD_SIGNATURE,
    Reason.RETIRED_KEY: Reason.UNTRUSTED_RETIRED_KEY,
    Reason.WRONG_TARGET: Reason.UNTRUSTED_WRONG_TARGET,
    Reason.BAD_TRUST_STORE: Reason.UNTRUSTED_BAD_TRUST_STORE,
}
