"""A port to serve on, checked before anything starts: a port another process holds is one line now, not a
server's traceback later (Ray Serve's after Ray started, MLflow's after its workers did)."""

from __future__ import annotations

import socket

from autoprune.errors import AutopruneError


def check_port_free(host: str, port: int, *, holder: str) -> None:
    """Raise a one-line error when `host:port` cannot be bound; `holder` guesses who holds it."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise AutopruneError(f"cannot serve on {host}:{port} ({error.strerror or error}): {holder} may hold it;"
                                 " pass another --port (or --host)") from None
