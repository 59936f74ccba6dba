"""edge-gateway: the daemon (CLI, config, composition root, pipeline, outbox, uplink, health)."""

__version__ = "0.1.0"
