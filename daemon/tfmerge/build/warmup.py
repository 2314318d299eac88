"""The warmup file TensorFlow Serving replays before a version goes live. Worker side.

``assets.extra/tf_serving_warmup_requests`` is a TFRecord file of serialised
``PredictionLog`` records; the server runs each request against the new version before it
takes traffic, so the first real request after a swap does not pay for lazy initialisation.
A failing warmup request fails the load, which is why the requests are the probe inputs the
build has just verified. The server reads at most 1000 records.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import numpy as np

from tfmerge.build import tfcore
from tfmerge.build.bundle import checksum, masked_crc32c
from tfmerge.logs import get_logger

WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
MAX_RECORDS = 1000


def write(
    export_dir: Path,
    model_name: str,
    feeds: Mapping[str, Mapping[str, np.ndarray]],
    aliases: Mapping[str, str],
) -> int:
    """One Predict request per signature (aliases excluded); returns how many were written."""
    # After tfcore (imported above): these protobufs import tensorflow's, which then load
    # alone instead of running the whole public API's __init__.
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    log = get_logger()
    signatures = sorted(name for name in feeds if name not in aliases)
    if len(signatures) > MAX_RECORDS:
        log.warning(
            "warmup_truncated",
            signatures=len(signatures),
            written=MAX_RECORDS,
            reason="TensorFlow Serving replays at most 1000 warmup records",
        )
        signatures = signatures[:MAX_RECORDS]
    path = export_dir / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with _RecordWriter(path) as writer:
        for name in signatures:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = name
            for key, value in sorted(feeds[name].items()):
                request.inputs[key].CopyFrom(tfcore.make_tensor_proto(value))
            record = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(record.SerializeToString(deterministic=True))
    return len(signatures)


class _RecordWriter:
    """A TFRecord file: each record its length, the length's masked crc32c, the bytes, and
    their masked crc32c (TensorFlow's ``tf.io.TFRecordWriter``, uncompressed)."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("wb")

    def write(self, data: bytes) -> None:
        length = struct.pack("<Q", len(data))
        self._file.write(length)
        self._file.write(struct.pack("<I", masked_crc32c(checksum(length))))
        self._file.write(data)
        self._file.write(struct.pack("<I", masked_crc32c(checksum(data))))

    def __enter__(self) -> _RecordWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._file.close()
