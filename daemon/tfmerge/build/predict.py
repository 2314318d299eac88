"""Predict requests to a live TensorFlow Serving, over gRPC or REST, for one exact version.

Requests name the version explicitly. TensorFlow Serving answers NOT_FOUND (404 over REST)
for a version it has not finished loading and UNAVAILABLE (503, or a refused connection)
while it starts: those failures are ``transient``. Over REST the answer is JSON, which carries
no dtype: each output is converted to the dtype the caller expects.

gRPC, numpy and TensorFlow's protobufs are imported inside the functions that need them.
"""

from __future__ import annotations

import base64
import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import numpy as np

Via = Literal["grpc", "rest"]
VIAS: tuple[Via, ...] = ("grpc", "rest")
#: One Predict call; a probe input is a handful of rows, so this only bounds a hung server.
CALL_TIMEOUT_SECONDS = 30.0
# TensorFlow Serving's REST front end maps NOT_FOUND to 404 and UNAVAILABLE to 503.
_TRANSIENT_HTTP = (404, 503)
_TRANSIENT_GRPC = ("UNAVAILABLE", "NOT_FOUND")


class CallFailed(Exception):
    """A request that got no usable answer; ``transient`` ones are worth another try."""

    def __init__(self, reason: str, *, transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


class Transport(Protocol):
    def predict(
        self, signature: str, feeds: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def open_transport(via: Via, where: str, model_name: str, version: int) -> Transport:
    """A client for ``where`` (HOST:PORT for gRPC, a URL for REST) asking for one version."""
    if via == "grpc":
        return Grpc(where, model_name, version)
    return Rest(where, model_name, version)


class Grpc:
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

        from tfmerge.build import tfcore

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


class Rest:
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
        request = urllib.request.Request(  # noqa: S310 - the smoke command allows http(s) only
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
