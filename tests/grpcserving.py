"""TensorFlow Serving's Predict front ends, gRPC and REST, in-process over a serving folder.

`tensorflow_model_server` cannot be installed from the package registries the suite builds
from, so these servers stand in for it on 127.0.0.1. Everything between the wire and the
model is the real thing: the gRPC service is TensorFlow Serving's own generated
`PredictionServiceServicer`, the REST body is read and written the way its `json_tensor.cc`
does (columnar format, base64 strings, floats printed with just enough digits), and a
version is loaded with the SavedModel loader under the tag `serve` in a session with the
default options, as the server loads it. The request's version is the one answered, and a
version that is not in the folder gets NOT_FOUND, as a version still loading does.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import re
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from servinglib import versions

_HTTP_STATUS = {"NOT_FOUND": 404, "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400}
_PREDICT_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?:predict$")


class ServingError(Exception):
    """A failed request, with the gRPC status code name TensorFlow Serving would answer."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ServedModel:
    """One model name over one base path: versions loaded on first use, kept until close()."""

    def __init__(self, base: Path, name: str) -> None:
        self.base = base
        self.name = name
        self._lock = threading.Lock()
        self._sessions: dict[int, tuple[Any, Any]] = {}

    def resolve(self, name: str, version: int | None) -> int:
        found = versions(self.base)
        if name != self.name or not found or (version is not None and version not in found):
            wanted = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
            raise ServingError("NOT_FOUND", f"Servable not found for request: {wanted}")
        return version if version is not None else max(found)

    def signature(self, version: int, name: str) -> Any:
        _, meta = self._load(version)
        if name not in meta.signature_def:
            raise ServingError("FAILED_PRECONDITION", f'Serving signature key "{name}" not found.')
        return meta.signature_def[name]

    def run(
        self, version: int, name: str, feeds: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        session, _ = self._load(version)
        signature = self.signature(version, name)
        if set(feeds) != set(signature.inputs):
            raise ServingError(
                "INVALID_ARGUMENT", f"inputs {sorted(feeds)} != {sorted(signature.inputs)}"
            )
        fetches = {key: info.name for key, info in signature.outputs.items()}
        feed_dict = {signature.inputs[key].name: value for key, value in feeds.items()}
        try:
            result: dict[str, np.ndarray] = session.run(fetches, feed_dict=feed_dict)
        except tf.errors.OpError as exc:
            raise ServingError("INVALID_ARGUMENT", exc.message) from exc
        return result

    def _load(self, version: int) -> tuple[Any, Any]:
        with self._lock:
            if version not in self._sessions:
                session = tf.compat.v1.Session(graph=tf.Graph())
                meta = tf.compat.v1.saved_model.loader.load(
                    session, ["serve"], str(self.base / str(version))
                )
                self._sessions[version] = (session, meta)
            return self._sessions[version]

    def close(self) -> None:
        with self._lock:
            for session, _ in self._sessions.values():
                session.close()
            self._sessions.clear()


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):  # type: ignore[misc]
    """TensorFlow Serving's Predict; subclasses override `answer` to misbehave."""

    def __init__(self, model: ServedModel) -> None:
        self.model = model
        self.requests: list[Any] = []

    def answer(
        self, version: int, signature: str, feeds: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        return self.model.run(version, signature, feeds)

    def Predict(self, request: Any, context: Any) -> Any:  # noqa: N802 - the generated service's method name
        self.requests.append(request)
        spec = request.model_spec
        try:
            version = self.model.resolve(
                spec.name, spec.version.value if spec.HasField("version") else None
            )
            feeds = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
            outputs = self.answer(version, spec.signature_name, feeds)
        except ServingError as exc:
            context.abort(getattr(grpc.StatusCode, exc.code), exc.message)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = version
        response.model_spec.signature_name = spec.signature_name
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response


@contextlib.contextmanager
def grpc_server(service: PredictionService) -> Iterator[str]:
    """Serve `service` on a free port of 127.0.0.1; yields its HOST:PORT."""
    executor = ThreadPoolExecutor(max_workers=2)
    server = grpc.server(executor)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait()
        executor.shutdown(wait=True)


# --- REST ---------------------------------------------------------------------------


def _decimal(value: float, dtype: Any) -> str:
    """A float as TensorFlow Serving prints it: six digits if they round-trip, else all."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "-Infinity" if value < 0 else "Infinity"
    text = f"{value:g}"
    if dtype(float(text)) != dtype(value):
        text = f"{value:.{9 if dtype == np.float32 else 17}g}"
    if "." not in text and "e" not in text:
        text += ".0"
    return text


def _json_tensor(value: np.ndarray, as_bytes: bool) -> str:
    def leaf(item: Any) -> str:
        if isinstance(item, bytes):
            if as_bytes:
                return json.dumps({"b64": base64.b64encode(item).decode("ascii")})
            # Raw bytes, as the server writes them; the reader undoes the escape.
            return json.dumps(item.decode("utf-8", "surrogateescape"), ensure_ascii=False)
        if value.dtype.kind == "f":
            return _decimal(float(item), value.dtype.type)
        return json.dumps(item)

    def walk(item: Any) -> str:
        if isinstance(item, list):
            return "[" + ",".join(walk(part) for part in item) + "]"
        return leaf(item)

    return walk(np.asarray(value).tolist())


def predict_json(outputs: Mapping[str, np.ndarray]) -> bytes:
    """A columnar :predict answer: one output bare, several in an object."""
    parts = {key: _json_tensor(value, key.endswith("_bytes")) for key, value in outputs.items()}
    if len(parts) == 1:
        body = next(iter(parts.values()))
    else:
        body = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in sorted(parts.items())) + "}"
    return ('{"outputs":' + body + "}").encode("utf-8", "surrogateescape")


def _tensor_from_json(value: Any, dtype: Any) -> np.ndarray:
    if dtype == tf.string:

        def leaf(item: Any) -> Any:
            if isinstance(item, list):
                return [leaf(part) for part in item]
            if isinstance(item, dict):
                return base64.b64decode(item["b64"], validate=True)
            return str(item).encode()

        return np.asarray(leaf(value), dtype=object)
    return np.asarray(value, dtype=dtype.as_numpy_dtype)


class RestServer:
    """`POST /v1/models/<name>[/versions/<N>]:predict`, columnar format, on 127.0.0.1."""

    def __init__(self, model: ServedModel) -> None:
        self.model = model
        #: (path, parsed body) of every request, in order.
        self.requests: list[tuple[str, dict[str, Any]]] = []

    def respond(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        self.requests.append((path, body))
        match = _PREDICT_PATH.match(path)
        if match is None:
            return 404, b'{"error": "Malformed request"}'
        try:
            version = self.model.resolve(
                match["name"], int(match["version"]) if match["version"] else None
            )
            name = body.get("signature_name", "serving_default")
            signature = self.model.signature(version, name)
            inputs = body["inputs"]
            feeds = {
                key: _tensor_from_json(inputs[key], tf.as_dtype(info.dtype))
                for key, info in signature.inputs.items()
            }
            return 200, predict_json(self.model.run(version, name, feeds))
        except ServingError as exc:
            return _HTTP_STATUS[exc.code], json.dumps({"error": exc.message}).encode()

    @contextlib.contextmanager
    def serving(self) -> Iterator[str]:
        """Serve on a free port of 127.0.0.1 from one thread; yields the base URL."""
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                status, payload = owner.respond(self.path, json.loads(self.rfile.read(length)))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
                pass

        server = HTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="rest-serving"
        )
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_port}"
        finally:
            server.shutdown()
            server.server_close()
            thread.join()
