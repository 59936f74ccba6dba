"""Reading secrets and TLS material named by the config (systemd credentials).

Both are read when a connection is made, never at import or load time, so a rotated credential
is picked up at the next connect; errors name the config key, never the secret.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path

from gateway.config import TlsSection, credential_path
from gateway.errors import TerminalUplinkError


def read_password(key: str, name: Path | None, environ: Mapping[str, str]) -> str | None:
    """The password in the credential file ``name`` (config key ``key``), or None."""
    if name is None:
        return None
    path = credential_path(name, environ)
    try:
        return path.read_text("utf-8").rstrip("\r\n")
    except OSError as exc:
        raise TerminalUplinkError(f"{key}: cannot read {path}: {exc.strerror}") from exc


def tls_context(key: str, tls: TlsSection, environ: Mapping[str, str]) -> ssl.SSLContext | None:
    """A client TLS context from section ``key``, or None when TLS is off."""
    if not tls.enabled:
        return None
    try:
        context = ssl.create_default_context(
            cafile=str(tls.ca_file) if tls.ca_file is not None else None
        )
        if tls.cert_file is not None and tls.key_file is not None:
            context.load_cert_chain(str(tls.cert_file), str(credential_path(tls.key_file, environ)))
    except (OSError, ssl.SSLError) as exc:
        raise TerminalUplinkError(f"{key}: cannot load certificates: {exc}") from exc
    return context
