"""``tfmerge smoke``: ask a live TensorFlow Serving for every signature of a published version.

Each signature gets the probe input its build checked it with, recomputed from the exact bytes
kept in the state folder, and the server's answer must match what the source graph computes on
it: same keys, dtypes and shapes; integers, booleans and strings equal, floats within the
numeric contract (``[smoke.tolerance]``, tfmerge.tolerance). The server runs its own graph
optimisations and perhaps oneDNN, so its floats may differ from the unoptimised source's in the
last bits; every result reports the largest absolute and relative difference.

Requests name the version explicitly, so a smoke right after a publish tests the new version,
not whichever one the server happens to serve. TensorFlow Serving answers NOT_FOUND (404 over
REST) for a version it has not finished loading and UNAVAILABLE (503, or a refused connection)
while it starts; those two are retried a few times with a short backoff. Any other answer is
final: a bad input or a broken signature fails the same way on every try.

Over REST the answer is JSON, which carries no dtype: each output is converted to the dtype the
source graph produced. TensorFlow Serving writes a float with as many digits as it needs to
round-trip (up to 9 for float32, 17 for float64), so JSON itself adds no difference.

The requests themselves are ``predict``'s. TensorFlow, numpy and gRPC are imported inside
the functions that need them, so importing this module stays as cheap as importing
``tfmerge.cli``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import tenacity

from tfmerge import exitcodes
from tfmerge.build.predict import VIAS, CallFailed, Transport, Via, open_transport
from tfmerge.config import Config
from tfmerge.folders import publish
from tfmerge.folders.state import Store
from tfmerge.logs import bound_context, get_logger
from tfmerge.models import AcceptedModel

if TYPE_CHECKING:
    import numpy as np

    from tfmerge.build.compare import Difference

#: Tries per signature while the server is starting or still loading the version.
ATTEMPTS = 5
#: Backoff between those tries: 0.5 s, 1 s, 2 s, 4 s.
FIRST_WAIT_SECONDS = 0.5
MAX_WAIT_SECONDS = 4.0


def smoke(
    config: Config,
    *,
    via: Via = "grpc",
    target: str | None = None,
    version: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Send every signature of a published version its probe input; compare with its source.

    ``target`` overrides ``[serving] grpc_target`` (HOST:PORT) or ``rest_url`` (a URL);
    ``version`` defaults to the newest in serving_dir. ``sleep`` waits between retries.
    Returns OK when every signature answered as its source does, FAILED when any did not or
    nothing is published, USAGE when there is nothing to send requests to.
    """
    with bound_context(command="smoke", via=via):
        return _smoke(config, via=via, target=target, version=version, sleep=sleep)


def _smoke(
    config: Config,
    *,
    via: Via,
    target: str | None,
    version: int | None,
    sleep: Callable[[float], None],
) -> int:
    log = get_logger()
    where = target or (config.serving.grpc_target if via == "grpc" else config.serving.rest_url)
    problem = _usage_problem(config, via, where, version)
    if problem is not None or where is None:
        log.error("smoke_not_run", version=version, reason=problem)
        return exitcodes.USAGE
    chosen = _chosen_version(config.serving_dir, version)
    if chosen is None:
        log.error("smoke_not_run", version=version, reason=f"no version in {config.serving_dir}")
        return exitcodes.FAILED
    number, version_dir = chosen
    with bound_context(version=number):
        return _smoke_version(config, via, where, number, version_dir, sleep)


def _smoke_version(
    config: Config,
    via: Via,
    where: str,
    number: int,
    version_dir: Path,
    sleep: Callable[[float], None],
) -> int:
    log = get_logger()
    signatures = publish.read_manifest(version_dir).get("signatures")
    if not isinstance(signatures, dict) or not signatures:
        log.error("smoke_not_run", reason=f"{version_dir} has no tfmerge manifest to smoke from")
        return exitcodes.FAILED

    transport = open_transport(via, where, config.serving.model_name, number)
    passed: list[str] = []
    failed: list[str] = []
    patient = True
    try:
        for name, entry in sorted(signatures.items()):
            try:
                seconds, gap = _smoke_one(
                    AcceptedModel.from_dict(entry), config, transport, sleep, patient=patient
                )
            except CallFailed as exc:
                # The server stayed unreachable, or the version unavailable, through a whole
                # backoff; waiting as long again for each further signature would only repeat it.
                patient = patient and not exc.transient
                log.error("smoke_failed", signature=name, reason=exc.reason)
                failed.append(name)
            except _Failure as exc:
                log.error("smoke_failed", signature=name, reason=str(exc), **_fields(exc.gap))
                failed.append(name)
            else:
                log.info("smoke_passed", signature=name, seconds=round(seconds, 4), **_fields(gap))
                passed.append(name)
    finally:
        transport.close()
    summary = log.error if failed else log.info
    summary("smoke_finished", target=where, passed=passed, failed=failed)
    return exitcodes.FAILED if failed else exitcodes.OK


class _Failure(Exception):
    """A signature that answered wrongly, or whose source cannot be recomputed."""

    def __init__(self, reason: str, gap: Difference | None = None) -> None:
        super().__init__(reason)
        #: How far the float answers were from the source's, when there were answers.
        self.gap = gap


def _fields(gap: Difference | None) -> dict[str, float]:
    if gap is None:
        return {}
    return {"max_abs_diff": gap.max_abs, "max_rel_diff": gap.max_rel}


def _usage_problem(config: Config, via: str, where: str | None, version: int | None) -> str | None:
    if via not in VIAS:
        return f"via must be one of {', '.join(VIAS)}, got {via!r}"
    if where is None:
        key = "grpc_target" if via == "grpc" else "rest_url"
        return f"no server to ask: pass a target or set [serving] {key} in {config.path}"
    if via == "rest" and not where.startswith(("http://", "https://")):
        return f"a REST target is an http:// or https:// URL, got {where!r}"
    if version is not None and version not in publish.versions(config.serving_dir):
        published = ", ".join(map(str, publish.versions(config.serving_dir))) or "none"
        return f"version {version} is not in {config.serving_dir} (published: {published})"
    return None


def _chosen_version(serving_dir: Path, version: int | None) -> tuple[int, Path] | None:
    if version is None:
        return publish.newest(serving_dir)
    return version, publish.versions(serving_dir)[version]


def _smoke_one(
    model: AcceptedModel,
    config: Config,
    transport: Transport,
    sleep: Callable[[float], None],
    *,
    patient: bool,
) -> tuple[float, Difference]:
    """Seconds from the first request to a correct answer, retries included, and how far the
    answer's floats were from the source's; raises otherwise."""
    from tfmerge.build.compare import Difference, difference, outputs_close

    log = get_logger()
    feeds, expected = _probe(model, config)

    def log_retry(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "smoke_retry",
            signature=model.signature,
            attempt=state.attempt_number,
            wait_seconds=state.next_action.sleep if state.next_action else 0.0,
            reason=str(exc),
        )

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(ATTEMPTS if patient else 1),
        wait=tenacity.wait_exponential(multiplier=FIRST_WAIT_SECONDS, max=MAX_WAIT_SECONDS),
        retry=tenacity.retry_if_exception(lambda e: isinstance(e, CallFailed) and e.transient),
        sleep=sleep,
        before_sleep=log_retry,
        reraise=True,
    )
    started = time.monotonic()
    actual = retrying(transport.predict, model.signature, feeds, expected)
    seconds = time.monotonic() - started
    problems = []
    gap = Difference()
    if set(actual) != set(expected):
        problems.append(f"outputs {sorted(actual)} != source outputs {sorted(expected)}")
    for key in sorted(set(actual) & set(expected)):
        gap = gap.worst(difference(expected[key], actual[key]))
        problem = outputs_close(expected[key], actual[key], config.smoke.tolerances)
        if problem:
            problems.append(f"output {key!r}: {problem}")
    if problems:
        raise _Failure("; ".join(problems), gap)
    return seconds, gap


def _probe(
    model: AcceptedModel, config: Config
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The probe input of a published signature and what its source graph answers to it."""
    from tfmerge.build.check import check_model
    from tfmerge.models import ModelRejected

    blob = Store(config.state_dir).blob_path(model.sha256, model.suffix)
    if not blob.is_file():
        raise _Failure(
            f"the checked copy of {model.relpath} (sha256 {model.sha256[:12]}) "
            f"is gone from {blob.parent}, so there is nothing to compare with"
        )
    try:
        checked = check_model(model.spec(), blob, config, kept=True)
    except ModelRejected as exc:
        raise _Failure(f"its source cannot be run: {exc.reason}") from exc
    if checked.model.sha256 != model.sha256:
        raise _Failure(f"the checked copy of {model.relpath} in {blob.parent} is damaged")
    return checked.feeds, checked.expected
