"""Transfer ids of model downloads: one naming for the coordinator that sends and the box that waits.

A transfer id keys a chunked blob (:mod:`protocol.chunks`); both ends must derive the same one.
"""

from __future__ import annotations


def model_transfer(version: str, have: str | None) -> str:
    """A version's weights for a box holding ``have``: its step or an XOR delta; whole when ``None``.

    The step from the parent is broadcast under this id too (``models/{version}/chunks``).
    """
    return f"model-{version}-from-{have or 'none'}"


def artifact_transfer(version: str, uri: str, have: str | None) -> str:
    """An inference artifact: whole (``have`` None), or a patch against ``have``'s same artifact."""
    return f"artifact-{version}-{uri}" + (f"-from-{have}" if have is not None else "")
