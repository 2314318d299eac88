"""Whether the daemon may use the network it is configured to use. No TensorFlow here.

Only two settings need IP: ``[serving] rest_url`` (following each publish) and ``[metrics]
listen`` (the Prometheus endpoint). The shipped systemd unit allows no IP sockets
(``RestrictAddressFamilies=AF_UNIX``, ``PrivateNetwork=yes``) unless its network drop-in is
installed. A daemon configured for either without it would wait ``live_timeout_seconds`` after
every publish for a server it cannot reach, or fail to start its endpoint. So at start and at
each reload the daemon opens an IP socket of the family each address needs; where the sandbox
refuses it (``EAFNOSUPPORT``, ``EPERM``, ``EACCES``), the setting is set aside for this run,
with a ``network_unavailable`` event that says how to allow it.
"""

from __future__ import annotations

import dataclasses
import errno
import socket
from urllib.parse import urlsplit

from tfmerge.config import Config
from tfmerge.logs import get_logger

_REFUSED = frozenset({errno.EAFNOSUPPORT, errno.EPERM, errno.EACCES})


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _refusal(family: socket.AddressFamily) -> str | None:
    """The errno name when this process may not open a socket of family, else None."""
    try:
        socket.socket(family, socket.SOCK_STREAM).close()
    except OSError as exc:
        if exc.errno in _REFUSED:
            return errno.errorcode[exc.errno]
        raise
    return None


def usable(config: Config) -> Config:
    """config, less the network settings this process may not use (each said once)."""
    refused: dict[str, str] = {}
    if config.serving.rest_url:
        host = urlsplit(config.serving.rest_url).hostname or ""
        code = _refusal(_family(host))
        if code is not None:
            refused["serving.rest_url"] = code
    if config.metrics.listen:
        host = config.metrics.listen.rpartition(":")[0].strip("[]")
        code = _refusal(_family(host))
        if code is not None:
            refused["metrics.listen"] = code
    if not refused:
        return config
    effects = {
        "serving.rest_url": "publishes are not followed",
        "metrics.listen": "no metrics are served",
    }
    get_logger().warning(
        "network_unavailable",
        keys=sorted(refused),
        errno=sorted(set(refused.values())),
        reason="this process may not open IP sockets (under systemd, install the unit's "
        "network drop-in: systemd/tfmerge-network.conf), so "
        + " and ".join(effects[key] for key in sorted(refused, reverse=True)),
    )
    serving = config.serving
    if "serving.rest_url" in refused:
        serving = dataclasses.replace(serving, rest_url=None)
    metrics = config.metrics
    if "metrics.listen" in refused:
        metrics = dataclasses.replace(metrics, listen=None)
    return dataclasses.replace(config, serving=serving, metrics=metrics)
