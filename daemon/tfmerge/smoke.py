"""``tfmerge smoke``: ask a live TensorFlow Serving for every signature of a published version.

Each signature gets the probe input its build checked it with, recomputed from the exact bytes
kept in the state folder, and the server's answer must equal what the source graph computes on
it: same keys, shapes and values (NaN equal to NaN).

Requests name the version explicitly, so a smoke right after a publish tests the new version,
not whichever one the server happens to serve. TensorFlow Serving answers NOT_FOUND (404 over
REST) for a version it has not finished loading and UNAVAILABLE (503, or a refused connection)
while it starts; those two are retried a few times with a short backoff. Any other answer is
final: a bad input or a broken signature fails the same way on every try.

Over REST the answer is JSON, which carries no dtype: each output is converted to the dtype the
source graph produced. TensorFlow Serving writes a float with as many digits as it needs to
round-trip (up to 9 for float32, 17 for float64), so the values still compare exactly.

TensorFlow, numpy and gRPC are imported inside the functions that need them, so importing
this module stays as cheap as importing ``tfmerge.cli``.
"""

from __future__ import annotations

import base64
import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import tenacity

from tfmerge import exitcodes, publish
from tfmerge.config import Config
from tfmerge.logs import get_logger
from tfmerge.store import AcceptedModel, Store

if TYPE_CHECKING:
    import numpy as np

Via = Literal["grpc", "rest"]
VIAS: tuple[Via, ...] = ("grpc", "rest")
#: One Predict call; a probe input is a handful of rows, so this only bounds a hung server.
CALL_TIMEOUT_SECONDS = 30.0
#: Tries per signature while the server is starting or still loading the version.
ATTEMPTS = 5
#: Backoff between those tries: 0.5 s, 1 s, 2 s, 4 s.
FIRST_WAIT_SECONDS = 0.5
MAX_WAIT_SECONDS = 4.0
# TensorFlow Serving's REST front end maps NOT_FOUND to 404 and UNAVAILABLE to 503.
_TRANSIENT_HTTP = (404, 503)
_TRANSIENT_GRPC = ("UNAVAILABLE", "NOT_FOUND")


class CallFailed(Exception):
    """A request that got no usable answer; ``transient`` ones are worth another try."""

    def __init__(self, reason: str, *, transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


class _Transport(Protocol):
    def predict(
        self, signature: str, feeds: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


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
    log = get_logger(command="smoke", via=via)
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
    log = log.bind(version=number)
    signatures = publish.read_manifest(version_dir).get("signatures")
    if not isinstance(signatures, dict) or not signatures:
        log.error("smoke_not_run", reason=f"{version_dir} has no tfmerge manifest to smoke from")
        return exitcodes.FAILED

    transport = _open(via, where, config.serving.model_name, number)
    passed: list[str] = []
    failed: list[str] = []
    patient = True
    try:
        for name, entry in sorted(signatures.items()):
            try:
                seconds = _smoke_one(
                    AcceptedModel.from_dict(entry), config, transport, log, sleep, patient=patient
                )
            except CallFailed as exc:
                # The server stayed unreachable, or the version unavailable, through a whole
                # backoff; waiting as long again for each further signature would only repeat it.
                patient = patient and not exc.transient
                log.error("smoke_failed", signature=name, reason=exc.reason)
                failed.append(name)
            except _Failure as exc:
                log.error("smoke_failed", signature=name, reason=str(exc))
                failed.append(name)
            else:
                log.info("smoke_passed", signature=name, seconds=round(seconds, 4))
                passed.append(name)
    finally:
        transport.close()
    summary = log.error if failed else log.info
    summary("smoke_finished", target=where, passed=passed, failed=failed)
    return exitcodes.FAILED if failed else exitcodes.OK


class _Failure(Exception):
    """A signature that answered wrongly, or whose source cannot be recomputed."""


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


def _open(via: Via, where: str, model_name: str, version: int) -> _Transport:
    if via == "grpc":
        return _Grpc(where, model_name, version)
    return _Rest(where, model_name, version)


def _smoke_one(
    model: AcceptedModel,
    config: Config,
    transport: _Transport,
    log: Any,
    sleep: Callable[[float], None],
    *,
    patient: bool,
) -> float:
    """Seconds from the first request to a correct answer, retries included; raises otherwise."""
    from tfmerge.verify import outputs_equal

    feeds, expected = _probe(model, config, log)

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
    if set(actual) != set(expected):
        problems.append(f"outputs {sorted(actual)} != source outputs {sorted(expected)}")
    for key in sorted(set(actual) & set(expected)):
        problem = outputs_equal(expected[key], actual[key])
        if problem:
            problems.append(f"output {key!r}: {problem}")
    if problems:
        raise _Failure("; ".join(problems))
    return seconds


def _probe(
    model: AcceptedModel, config: Config, log: Any
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The probe input of a published signature and what its source graph answers to it."""
    from tfmerge.build import check_model, spec_of
    from tfmerge.graphs import ModelRejected

    blob = Store(config.state_dir).blob_path(model.sha256, model.suffix)
    if not blob.is_file():
        raise _Failure(
            f"the checked copy of {model.relpath} (sha256 {model.sha256[:12]}) "
            f"is gone from {blob.parent}, so there is nothing to compare with"
        )
    try:
        checked = check_model(spec_of(model), blob, config, kept=True, log=log)
    except ModelRejected as exc:
        raise _Failure(f"its source cannot be run: {exc.reason}") from exc
    if checked.model.sha256 != model.sha256:
        raise _Failure(f"the checked copy of {model.relpath} in {blob.parent} is damaged")
    return checked.feeds, checked.expected


class _Grpc:
    """PredictionService/Predict over an insecure channel, asking for one exact version."""

    def __init__(self, target: str, model_name: str, version: int) -> None:
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self._model_name = model_name
        self._version = version
        # Outputs can outgrow gRPC's 4 MiB default long before they bother the server.
        self._channel = grpc.insecure_channel(
            target, options=[("grpc.max_receive_message_length", -1)]
        )
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def predict(
        self, signature: str, feeds: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        import grpc
        from tensorflow_serving.apis import predict_pb2

        from tfmerge import tfcore

        request = predict_pb2.PredictRequest()
        request.model_spec.name = self._model_name
        request.model_spec.signature_name = signature
        request.model_spec.version.value = self._version
        for key, value in feeds.items():
            request.inputs[key].CopyFrom(tfcore.make_tensor_proto(value))
        try:
            response = self._stub.Predict(request, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.RpcError as exc:
            code = exc.code()
            raise CallFailed(
                f"{code.name}: {exc.details()}", transient=code.name in _TRANSIENT_GRPC
            ) from exc
        answered = response.model_spec.version.value
        if response.model_spec.HasField("version") and answered != self._version:
            raise CallFailed(f"answered by version {answered}", transient=False)
        return {key: tfcore.MakeNdarray(proto) for key, proto in response.outputs.items()}

    def close(self) -> None:
        self._channel.close()


class _Rest:
    """POST ``/v1/models/<name>/versions/<N>:predict`` in the columnar ("inputs") format."""

    def __init__(self, base_url: str, model_name: str, version: int) -> None:
        name = urllib.parse.quote(model_name, safe="")
        self.url = f"{base_url.rstrip('/')}/v1/models/{name}/versions/{version}:predict"

    def predict(
        self, signature: str, feeds: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        body = json.dumps(
            {"signature_name": signature, "inputs": {k: to_json(v) for k, v in feeds.items()}}
        ).encode()
        request = urllib.request.Request(  # noqa: S310 - _usage_problem allows http(s) only
            self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=CALL_TIMEOUT_SECONDS) as answer:  # noqa: S310 - http(s) only, as above
                raw = answer.read()
        except urllib.error.HTTPError as exc:
            raise CallFailed(
                f"HTTP {exc.code}: {_error_text(exc)}", transient=exc.code in _TRANSIENT_HTTP
            ) from exc
        except urllib.error.URLError as exc:
            # A refused connection is a server still starting; a timeout is a hung one.
            timed_out = isinstance(exc.reason, TimeoutError)
            raise CallFailed(f"{self.url}: {exc.reason}", transient=not timed_out) from exc
        except TimeoutError as exc:
            raise CallFailed(
                f"no answer within {CALL_TIMEOUT_SECONDS:g} s", transient=False
            ) from exc
        except ConnectionError as exc:
            raise CallFailed(f"{self.url}: {exc}", transient=True) from exc
        except http.client.HTTPException as exc:
            raise CallFailed(
                f"{self.url}: not an HTTP answer ({type(exc).__name__}: {exc})", transient=False
            ) from exc
        return outputs_from_json(raw, like)

    def close(self) -> None:
        pass


def _error_text(error: urllib.error.HTTPError) -> str:
    text = error.read().decode("utf-8", "replace")
    try:
        message = json.loads(text).get("error")
    except (ValueError, AttributeError):
        message = None
    return str(message) if message else text.strip() or str(error.reason)


def to_json(value: np.ndarray) -> Any:
    """A tensor as TensorFlow Serving's REST API reads it: nested lists, strings as base64."""
    import numpy as np

    value = np.asarray(value)
    if value.dtype == object or value.dtype.kind in "SU":
        return _map_leaves(value.tolist(), _b64)
    return value.tolist()


def _b64(leaf: Any) -> dict[str, str]:
    data = leaf.encode() if isinstance(leaf, str) else bytes(leaf)
    return {"b64": base64.b64encode(data).decode("ascii")}


def _from_json_string(leaf: Any) -> Any:
    if isinstance(leaf, dict) and set(leaf) == {"b64"}:
        return base64.b64decode(leaf["b64"], validate=True)
    if isinstance(leaf, str):
        # The server writes a string tensor's raw bytes; see outputs_from_json.
        return leaf.encode("utf-8", "surrogateescape")
    raise TypeError(f"expected a string or a {{'b64': ...}} object, got {leaf!r}")


def _map_leaves(value: Any, function: Callable[[Any], Any]) -> Any:
    if isinstance(value, list):
        return [_map_leaves(item, function) for item in value]
    return function(value)


def outputs_from_json(raw: bytes, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Parse a columnar :predict answer into arrays of the dtypes in ``like``.

    TensorFlow Serving writes one output as a bare value and several as an object keyed by
    output. String outputs are base64 objects when their key ends in ``_bytes`` and the raw
    bytes otherwise, which need not be UTF-8: they are decoded with surrogate escapes and
    encoded back to the same bytes.
    """
    import numpy as np

    try:
        document = json.loads(raw.decode("utf-8", "surrogateescape"))
        outputs = document["outputs"]
    except (ValueError, TypeError, KeyError) as exc:
        raise CallFailed(f"not a :predict answer: {raw[:200]!r}", transient=False) from exc
    if len(like) == 1 and not (isinstance(outputs, dict) and set(outputs) == set(like)):
        outputs = {next(iter(like)): outputs}
    if not isinstance(outputs, dict):
        raise CallFailed(f"expected outputs {sorted(like)}, got one bare value", transient=False)
    arrays = {}
    for key, value in outputs.items():
        want = like.get(key)
        if want is None:
            arrays[key] = np.asarray(value)
            continue
        try:
            if want.dtype == object:
                array = np.asarray(_map_leaves(value, _from_json_string), dtype=object)
            else:
                array = np.asarray(value, dtype=want.dtype)
        except (TypeError, ValueError) as exc:
            raise CallFailed(
                f"output {key!r} is not a {want.dtype} array: {exc}", transient=False
            ) from exc
        if array.size == 0 and want.size == 0:
            # JSON cannot say the shape of an empty array beyond its first empty dimension.
            array = array.reshape(want.shape)
        arrays[key] = array
    return arrays
