"""The gateway's small exception hierarchy.

Expected failures are handled where they happen; these types say which kind of failure crossed a
boundary so the composition root can choose the exit code (78 for configuration, 70 otherwise).
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class TerminalUplinkError(GatewayError):
    """The broker refused us for a reason that retrying cannot fix (credentials, authorisation)."""


class EventValidationError(GatewayError, ValueError):
    """An event or reading was built with values it cannot carry."""


class OutboxError(GatewayError):
    """The durable outbox cannot be opened or written."""


class SourceError(GatewayError):
    """A source failed in a way its own retry loop did not absorb."""


class CodecError(GatewayError, ValueError):
    """A payload cannot be decoded by its codec (truncated, malformed, unknown port, ...)."""


class ModelError(GatewayError):
    """A model card or model file cannot be used (bad card, wrong digest or signature, failed run).

    The message names the card or model file first: ``FILE: key: problem (got: value)``.
    """
