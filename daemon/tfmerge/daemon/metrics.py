"""The optional Prometheus endpoint (``[metrics] listen``). No TensorFlow here.

Metric names are documented in docs/metrics.md.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from tfmerge.folders import publish
from tfmerge.logs import get_logger

_SECONDS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.builds = Counter(
            "tfmerge_builds",
            "Builds, by outcome (published, unchanged, empty, failed, error).",
            ["outcome"],
            registry=r,
        )
        self.build_seconds = Histogram(
            "tfmerge_build_duration_seconds",
            "Wall time of a build, from its start to its summary line.",
            buckets=_SECONDS,
            registry=r,
        )
        self.time_to_live = Histogram(
            "tfmerge_time_to_live_seconds",
            "From the last change of the settled batch to the rename of the new version.",
            buckets=_SECONDS,
            registry=r,
        )
        self.version_live = Histogram(
            "tfmerge_version_live_seconds",
            "From the rename of a version to TensorFlow Serving reporting it AVAILABLE.",
            buckets=_SECONDS,
            registry=r,
        )
        self.published_version = Gauge(
            "tfmerge_published_version", "The newest version in the serving folder.", registry=r
        )
        self.signatures = Gauge(
            "tfmerge_signatures_served", "Signatures in the newest published version.", registry=r
        )
        self.rejected = Gauge(
            "tfmerge_rejected_inputs", "Inputs refused by the last build.", registry=r
        )
        self.last_publish = Gauge(
            "tfmerge_last_publish_timestamp_seconds",
            "Unix time of the last successful publish.",
            registry=r,
        )
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self, listen: str, serving_dir: Path) -> None:
        """Serve at listen, showing what serving_dir serves until the first build says more."""
        self.serve(listen)
        newest = publish.newest(serving_dir)
        if newest is not None:
            signatures = publish.read_manifest(newest[1]).get("signatures", {})
            self.serving(newest[0], len(signatures))
        get_logger().info("metrics_listening", listen=listen)

    def serve(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        self._server, self._thread = start_http_server(
            int(port), addr=host.strip("[]"), registry=self.registry
        )

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def build_finished(
        self,
        outcome: str,
        fields: Mapping[str, Any],
        version: int | None,
        *,
        time_to_live: float | None = None,
    ) -> None:
        self.builds.labels(outcome=outcome).inc()
        durations = fields.get("durations", {})
        if "total" in durations:
            self.build_seconds.observe(durations["total"])
        if "rejected" in fields:
            self.rejected.set(len(fields["rejected"]))
        if version is not None:
            self.published_version.set(fields.get("restored", version))
            self.signatures.set(fields.get("signatures", 0))
            self.last_publish.set(time.time())
            if time_to_live is not None:
                self.time_to_live.observe(time_to_live)
        if fields.get("live") and "live_seconds" in fields:
            self.version_live.observe(fields["live_seconds"])

    def serving(self, version: int | None, signatures: int) -> None:
        """The state found at start-up, before any build."""
        if version is not None:
            self.published_version.set(version)
            self.signatures.set(signatures)
