"""Errors of the agent RPC, as members of the one tree in ``orthros_py.errors``.

No interface and no privilege: plain exception classes. Refusals (bad frame, bad MAC, replay,
unknown version) carry a ``Refusal`` code, which is what the agent sends back, unauthenticated,
before it closes the connection; everything else crosses the wire as an authenticated error
response through ``OrthrosError.to_dict``.
"""

from __future__ import annotations

import enum
from typing import Any

from orthros_py.errors import OrthrosError, registered


class Refusal(enum.StrEnum):
    """Why a frame was refused. Sent in refusal frames; the connection is closed after it."""

    MALFORMED = "malformed"  # not a frame, not JSON, missing or mistyped fields
    OVERSIZE = "oversize"  # a header larger than MAX_HEADER
    VERSION = "version"  # a protocol version this side does not speak
    AUTH = "auth"  # the MAC does not match: another key, or a forged or damaged frame
    REPLAY = "replay"  # timestamp outside the window, or a nonce seen inside it
    BUSY = "busy"  # too many connections, or the replay cache is full
    BAD_REQUEST = "bad_request"  # authenticated, but an unknown op or bad arguments


class AgentError(OrthrosError):
    """Base of the errors of the agent RPC itself (not of the operations it runs)."""


class ProtocolError(AgentError):
    """A frame that does not follow the protocol; ``code`` says which rule it broke."""

    def __init__(self, msg: str, *, code: Refusal = Refusal.MALFORMED, **context: Any) -> None:
        super().__init__(msg, **context)
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["code"] = str(self.code)
        return data


class VersionError(ProtocolError):
    def __init__(self, msg: str, **context: Any) -> None:
        super().__init__(msg, code=Refusal.VERSION, **context)


class AuthError(ProtocolError):
    """The frame's MAC does not verify with this side's cluster key."""

    def __init__(self, msg: str, *, code: Refusal = Refusal.AUTH, **context: Any) -> None:
        super().__init__(msg, code=code, **context)


class ReplayError(AuthError):
    """A well-signed frame that was seen before, or is too old or too new to tell."""

    def __init__(self, msg: str, *, code: Refusal = Refusal.REPLAY, **context: Any) -> None:
        super().__init__(msg, code=code, **context)


class AgentRefused(AgentError):
    """The agent refused a request before running it (the client's view of a refusal)."""

    def __init__(self, msg: str, *, code: str = "", **context: Any) -> None:
        super().__init__(msg, **context)
        self.code = code


class AgentUnreachable(AgentError):
    """No connection to the agent: refused, timed out, no route."""


class KeyFileError(AgentError):
    """The cluster key file is missing, unreadable, too short or too open."""


# Each class above registered itself in the one tree (OrthrosError.__init_subclass__); this view
# by name is kept for the code that asks for agent errors only.
AGENT_ERRORS: dict[str, type[AgentError]] = {
    name: cls for name, cls in registered().items() if issubclass(cls, AgentError)
}
