"""MQTT topic names: the one module that builds and parses them.

ChirpStack-style names so LoRaWAN operators recognise them:
``{prefix}/gateway/{gateway_id}/event/{kind}``, ``.../state/conn``, ``.../state/stats``,
``.../command/{name}``.
"""

from __future__ import annotations

from dataclasses import dataclass

BATCH_KIND = "batch"


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names of one gateway."""

    prefix: str
    gateway_id: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/gateway/{self.gateway_id}"

    def event(self, kind: str) -> str:
        return f"{self.base}/event/{kind}"

    @property
    def batch(self) -> str:
        return self.event(BATCH_KIND)

    @property
    def conn(self) -> str:
        return f"{self.base}/state/conn"

    @property
    def stats(self) -> str:
        return f"{self.base}/state/stats"

    @property
    def commands(self) -> str:
        """Subscription filter for every command addressed to this gateway."""
        return f"{self.base}/command/+"

    def command_name(self, topic: str) -> str | None:
        """The command name of a command topic, or None if the topic is not one of ours."""
        head = f"{self.base}/command/"
        if not topic.startswith(head):
            return None
        name = topic[len(head) :]
        return name if name and "/" not in name else None
