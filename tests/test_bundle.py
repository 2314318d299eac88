"""The checkpoint writer, read back by TensorFlow itself: its checkpoint reader, RestoreV2, SavedModel."""

from __future__ import annotations

import errno
import shutil
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tfmerge.build import bundle
from tfmerge.build.bundle import DataWriter, Entry, write_index

BFLOAT16 = tf.bfloat16.as_numpy_dtype
_FOOTER_SIZE = 48
_LAYERS = 3000


def datatype(array: np.ndarray) -> int:
    return int(tf.as_dtype(array.dtype).as_datatype_enum)


def write_bundle(prefix: Path, tensors: Mapping[str, np.ndarray]) -> list[Entry]:
    entries = []
    with DataWriter(prefix) as writer:
        for name, array in tensors.items():
            offset, size, crc = writer.append(array)
            entries.append(Entry(name, datatype(array), array.shape, offset, size, crc))
        writer.start_sync()
        write_index(prefix, entries)
    return entries


def restore(prefix: Path, names: list[str], dtypes: list[tf.DType]) -> list[np.ndarray]:
    tensors = tf.raw_ops.RestoreV2(
        prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names), dtypes=dtypes
    )
    return [tensor.numpy() for tensor in tensors]


def save_v2(prefix: Path, tensors: Mapping[str, np.ndarray], names: list[str]) -> Path:
    """TensorFlow's own SaveV2 of tensors, in the order of names."""
    tf.raw_ops.SaveV2(
        prefix=str(prefix),
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[tf.constant(tensors[name]) for name in names],
    )
    return prefix


def assert_same_tensor(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.tobytes() == want.tobytes()


def index_block_entries(index: Path) -> int:
    """How many data blocks the table has: one index block entry each (restart interval 1)."""
    table = index.read_bytes()
    footer = table[-_FOOTER_SIZE:]
    assert struct.unpack("<Q", footer[-8:])[0] == 0xDB4775248B80FB57
    handles = []
    position = 0
    for _ in range(4):
        value = shift = 0
        while True:
            byte = footer[position]
            position += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        handles.append(value)
    index_offset, index_size = handles[2], handles[3]
    block = table[index_offset : index_offset + index_size]
    return int(struct.unpack("<I", block[-4:])[0])


def sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20260512)
    tensors: dict[str, np.ndarray] = {
        # Inserted out of order on purpose: the index must sort them.
        "zeta/bias": rng.standard_normal(7).astype(np.float32),
        "scalar": np.array(3.25, dtype=np.float32),
        "half": rng.standard_normal((2, 3)).astype(np.float16),
        "brain": rng.standard_normal((4, 5)).astype(BFLOAT16),
        "bytes/int8": rng.integers(-128, 128, (3, 3), dtype=np.int8),
        "empty/int8": np.zeros((0, 5), dtype=np.int8),
        "counts": rng.integers(-(2**62), 2**62, (3,), dtype=np.int64),
        "pixels": rng.integers(0, 256, (2, 2, 3), dtype=np.uint8),
        "mask": rng.integers(0, 2, (6,), dtype=np.uint8).astype(np.bool_),
        "waves": (rng.standard_normal(4) + 1j * rng.standard_normal(4)).astype(np.complex64),
        # Larger than the reader's 1 MiB buffer: restored through its direct-read path.
        "large/kernel": rng.standard_normal((1280, 1024)).astype(np.float32),
        "Zulu": np.array([1, 2], dtype=np.int64),
        "caf\u00e9/\u00fcber": np.array([1.5], dtype=np.float32),
    }
    for layer in range(_LAYERS):
        name = (
            f"encoder/block_{layer // 100:02d}/attention/multi_head/"
            f"query_projection/dense_{layer % 100:02d}/kernel_{layer:04d}"
        )
        tensors[name] = np.full((2,), layer, dtype=np.int32)
    return tensors


@pytest.fixture(scope="module")
def tensors() -> dict[str, np.ndarray]:
    return sample_tensors()


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, tensors: dict[str, np.ndarray]) -> Path:
    prefix = tmp_path_factory.mktemp("bundle") / "variables" / "variables"
    write_bundle(prefix, tensors)
    return prefix


def copy_bundle(prefix: Path, to: Path) -> Path:
    copy = to / prefix.name
    for source in (bundle.data_path(prefix), bundle.index_path(prefix)):
        shutil.copyfile(source, to / source.name)
    return copy


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ 0x01]))


def test_the_file_names_are_tensorflows(written: Path) -> None:
    assert bundle.index_path(written).name == "variables.index"
    assert bundle.data_path(written).name == "variables.data-00000-of-00001"
    assert {path.name for path in written.parent.iterdir()} == {
        "variables.index",
        "variables.data-00000-of-00001",
    }


def test_the_index_spans_several_blocks(written: Path) -> None:
    assert index_block_entries(bundle.index_path(written)) >= 2


def test_checkpoint_reader_reads_every_tensor(
    written: Path, tensors: dict[str, np.ndarray]
) -> None:
    reader = tf.train.load_checkpoint(str(written))
    assert reader.get_variable_to_dtype_map() == {
        name: tf.as_dtype(array.dtype) for name, array in tensors.items()
    }
    assert reader.get_variable_to_shape_map() == {
        name: list(array.shape) for name, array in tensors.items()
    }
    for name, array in tensors.items():
        assert_same_tensor(np.asarray(reader.get_tensor(name)), array)


def test_restore_v2_restores_every_tensor(written: Path, tensors: dict[str, np.ndarray]) -> None:
    names = list(tensors)
    restored = restore(written, names, [tf.as_dtype(tensors[name].dtype) for name in names])
    for name, got in zip(names, restored, strict=True):
        assert_same_tensor(got, tensors[name])


def test_the_data_file_holds_the_tensors_back_to_back(
    written: Path, tensors: dict[str, np.ndarray]
) -> None:
    assert bundle.data_path(written).read_bytes() == b"".join(a.tobytes() for a in tensors.values())


@pytest.mark.parametrize("name", ["large/kernel", "zeta/bias"])
def test_a_corrupted_data_byte_fails_the_restore(
    written: Path, tensors: dict[str, np.ndarray], tmp_path: Path, name: str
) -> None:
    copy = copy_bundle(written, tmp_path)
    offset = 0
    for other, array in tensors.items():
        if other == name:
            break
        offset += array.nbytes
    flip_byte(bundle.data_path(copy), offset + tensors[name].nbytes // 2)
    with pytest.raises(tf.errors.DataLossError, match="Checksum does not match"):
        restore(copy, [name], [tf.as_dtype(tensors[name].dtype)])
    # The bytes of every other tensor are still good, and still checked.
    assert_same_tensor(restore(copy, ["scalar"], [tf.float32])[0], tensors["scalar"])


def test_a_corrupted_index_byte_fails_the_open(tmp_path: Path) -> None:
    # One block: with several, TensorFlow's table iterator skips a block that fails its
    # checksum and reads on in the next, so the failure shows up as a confusing other error.
    prefix = tmp_path / "variables"
    write_bundle(prefix, {"scalar": np.array(1.0, np.float32), "b": np.array([2], np.int64)})
    assert index_block_entries(bundle.index_path(prefix)) == 1
    assert_same_tensor(restore(prefix, ["scalar"], [tf.float32])[0], np.array(1.0, np.float32))
    flip_byte(bundle.index_path(prefix), 12)
    with pytest.raises(tf.errors.DataLossError, match="block checksum mismatch"):
        restore(prefix, ["scalar"], [tf.float32])


def test_tensorflows_own_save_restores_the_same_bytes(
    written: Path, tensors: dict[str, np.ndarray], tmp_path: Path
) -> None:
    names = sorted(tensors)
    theirs = save_v2(tmp_path / "saved" / "variables", tensors, names)
    dtypes = [tf.as_dtype(tensors[name].dtype) for name in names]
    ours_restored = restore(written, names, dtypes)
    theirs_restored = restore(theirs, names, dtypes)
    for name, ours, their in zip(names, ours_restored, theirs_restored, strict=True):
        assert_same_tensor(their, tensors[name])
        assert_same_tensor(ours, their)


def test_a_bundle_in_tensorflows_order_has_its_data_file_byte_for_byte(
    tensors: dict[str, np.ndarray], tmp_path: Path
) -> None:
    names = sorted(tensors, key=str.encode)
    ours = tmp_path / "ours" / "variables"
    write_bundle(ours, {name: tensors[name] for name in names})
    theirs = save_v2(tmp_path / "theirs" / "variables", tensors, names)
    assert bundle.data_path(ours).read_bytes() == bundle.data_path(theirs).read_bytes()


def test_every_dtype_of_the_table_is_tensorflows_and_restores(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    prefix = tmp_path / "all" / "variables"
    raw: dict[str, bytes] = {}
    entries = []
    with DataWriter(prefix) as writer:
        for dtype, item_size in bundle.ITEM_SIZES.items():
            tf_dtype = tf.as_dtype(dtype)
            assert tf_dtype.size == item_size
            assert tf_dtype not in (tf.string, tf.variant, tf.resource)
            # 0 and 1 are valid values of every dtype, down to two-bit integers and bool.
            data = rng.integers(0, 2, 6 * item_size, dtype=np.uint8).tobytes()
            offset, size, crc = writer.append(data)
            raw[tf_dtype.name] = data
            entries.append(Entry(tf_dtype.name, dtype, (2, 3), offset, size, crc))
    write_index(prefix, entries)
    names = [entry.key for entry in entries]
    restored = restore(prefix, names, [tf.as_dtype(entry.dtype) for entry in entries])
    for name, got in zip(names, restored, strict=True):
        assert got.shape == (2, 3)
        assert got.tobytes() == raw[name]


def test_many_small_blocks_all_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 1 KiB block size puts a block boundary every few entries: every key next to a
    # boundary is looked up through the index block.
    monkeypatch.setattr(bundle, "_BLOCK_SIZE", 1024)
    tensors = {f"layer_{i:04d}/w": np.full((1,), i, dtype=np.int32) for i in range(500)}
    prefix = tmp_path / "variables"
    write_bundle(prefix, tensors)
    assert index_block_entries(bundle.index_path(prefix)) > 10
    names = list(tensors)
    for name, got in zip(names, restore(prefix, names, [tf.int32] * len(names)), strict=True):
        assert_same_tensor(got, tensors[name])
    missing = ["layer_0250/v", "layer_9999/w", "a", "\U0010ffff"]
    for name in missing:
        with pytest.raises(tf.errors.NotFoundError):
            restore(prefix, [name], [tf.int32])


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    keys=st.sets(
        st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=12),
        min_size=1,
        max_size=60,
    ),
    block_size=st.sampled_from([64, 300, 256 << 10]),
)
def test_any_set_of_names_reads_back(
    monkeypatch: pytest.MonkeyPatch, keys: set[str], block_size: int
) -> None:
    monkeypatch.setattr(bundle, "_BLOCK_SIZE", block_size)
    tensors = {key: np.array([len(key), i], dtype=np.int64) for i, key in enumerate(keys)}
    with tempfile.TemporaryDirectory() as folder:
        prefix = Path(folder) / "variables"
        write_bundle(prefix, tensors)
        reader = tf.train.load_checkpoint(str(prefix))
        assert set(reader.get_variable_to_shape_map()) == keys
        names = list(tensors)
        for name, got in zip(names, restore(prefix, names, [tf.int64] * len(names)), strict=True):
            assert_same_tensor(got, tensors[name])


@pytest.fixture
def tf1_saved_model(tmp_path: Path) -> Path:
    export = tmp_path / "model"
    graph = tf.Graph()
    with graph.as_default():
        kernel = tf.compat.v1.get_variable("dense/kernel", initializer=np.zeros((2, 3), np.float32))
        bias = tf.compat.v1.get_variable("dense/bias", initializer=np.zeros((3,), np.float32))
        x = tf.compat.v1.placeholder(tf.float32, (None, 2), name="x")
        y = tf.identity(tf.matmul(x, kernel) + bias, name="y")
        signature = tf.compat.v1.saved_model.predict_signature_def({"x": x}, {"y": y})
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            builder = tf.compat.v1.saved_model.Builder(str(export))
            builder.add_meta_graph_and_variables(
                session, ["serve"], signature_def_map={"serving_default": signature}
            )
            builder.save()
    return export


def test_the_saved_model_loader_restores_the_variables(tf1_saved_model: Path) -> None:
    prefix = tf1_saved_model / "variables" / "variables"
    assert dict(tf.train.list_variables(str(prefix))) == {"dense/bias": [3], "dense/kernel": [2, 3]}
    for path in prefix.parent.iterdir():
        path.unlink()
    kernel = np.arange(6, dtype=np.float32).reshape(2, 3)
    bias = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    write_bundle(prefix, {"dense/kernel": kernel, "dense/bias": bias})
    loaded: Any = tf.saved_model.load(str(tf1_saved_model))
    x = np.array([[1.0, 2.0]], dtype=np.float32)
    got = loaded.signatures["serving_default"](x=tf.constant(x))["y"].numpy()
    # Sums of small integers and halves: exact in float32 under any kernel and any order.
    np.testing.assert_array_equal(got, x @ kernel + bias)


def test_append_writes_exactly_the_bytes_of_a_view(tmp_path: Path) -> None:
    backing = bytes(range(256)) * 64
    matrix = np.arange(60, dtype=np.float32).reshape(6, 10)
    prefix = tmp_path / "deep" / "er" / "variables"
    with DataWriter(prefix) as writer:
        assert not writer.path.exists()
        first = writer.append(memoryview(backing)[100:1100])
        rows = writer.append(matrix[2:5])
        element = writer.append(matrix[4, 3:4])
        empty = writer.append(memoryview(backing)[7:7])
        assert writer.bytes_written == 1000 + 120 + 4
    expected = [backing[100:1100], matrix[2:5].tobytes(), matrix[4, 3:4].tobytes(), b""]
    assert writer.path == bundle.data_path(prefix)
    assert writer.path.read_bytes() == b"".join(expected)
    offsets = [0, 1000, 1120, 1124]
    for (offset, size, crc), data, at in zip(
        [first, rows, element, empty], expected, offsets, strict=True
    ):
        assert (offset, size, crc) == (at, len(data), google_crc32c.value(data))
    assert empty[2] == 0


def test_append_refuses_a_strided_view(tmp_path: Path) -> None:
    matrix = np.arange(60, dtype=np.float32).reshape(6, 10)
    with DataWriter(tmp_path / "variables") as writer:
        with pytest.raises(ValueError, match="C-contiguous"):
            writer.append(matrix[:, 2:4])
        with pytest.raises(ValueError, match="C-contiguous"):
            writer.append(matrix.T)
        with pytest.raises(ValueError, match="C-contiguous"):
            writer.append(memoryview(bytes(100))[::2])
        assert writer.bytes_written == 0


def test_the_masked_crc_is_tensorflows() -> None:
    # crc32c::Mask of TensorFlow's crc32c_test.cc, MaskTest: Mask(crc) != crc, and Unmask inverts.
    crc = google_crc32c.value(b"foo")
    masked = bundle.masked_crc32c(crc)
    rotated = (masked - 0xA282EAD8) & 0xFFFFFFFF
    assert ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF == crc
    assert masked != crc
    assert bundle.masked_crc32c(0) == 0xA282EAD8


def test_sync_then_close_and_close_again(tmp_path: Path) -> None:
    writer = DataWriter(tmp_path / "variables")
    writer.append(b"abc")
    writer.start_sync()
    writer.start_sync()
    with pytest.raises(RuntimeError, match="being synced"):
        writer.append(b"d")
    writer.close()
    writer.close()
    with pytest.raises(RuntimeError, match="already closed"):
        writer.start_sync()
    with pytest.raises(RuntimeError, match="already closed"):
        writer.append(b"d")
    assert writer.path.read_bytes() == b"abc"


def test_start_sync_alone_creates_the_file(tmp_path: Path) -> None:
    with DataWriter(tmp_path / "a" / "variables") as writer:
        writer.start_sync()
    assert writer.path.read_bytes() == b""


def test_close_raises_the_sync_error(tmp_path: Path) -> None:
    # fdatasync of a character device fails with EINVAL: a real sync error, every time.
    prefix = tmp_path / "variables"
    bundle.data_path(prefix).symlink_to("/dev/null")
    writer = DataWriter(prefix)
    writer.append(b"abc")
    writer.start_sync()
    with pytest.raises(OSError, match="Invalid argument") as raised:
        writer.close()
    assert raised.value.errno == errno.EINVAL
    writer.close()


def test_a_failed_write_stops_further_appends(tmp_path: Path) -> None:
    prefix = tmp_path / "variables"
    bundle.data_path(prefix).symlink_to("/dev/full")
    with DataWriter(prefix) as writer:
        with pytest.raises(OSError, match="No space left") as raised:
            writer.append(b"abc")
        assert raised.value.errno == errno.ENOSPC
        with pytest.raises(RuntimeError, match="earlier write"):
            writer.append(b"abc")
        assert writer.bytes_written == 0


def _entry(key: str = "w", **changes: Any) -> Entry:
    fields: dict[str, Any] = {
        "key": key,
        "dtype": 1,
        "shape": (2,),
        "offset": 0,
        "size": 8,
        "crc32c": 0,
    }
    fields.update(changes)
    return Entry(**fields)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([_entry("w"), _entry("v"), _entry("w")], "'w' is in the bundle twice"),
        ([_entry("")], "empty key"),
        ([_entry(dtype=7)], "dtype 7 is not a numeric"),
        ([_entry(dtype=20)], "dtype 20 is not a numeric"),
        ([_entry(dtype=21)], "dtype 21 is not a numeric"),
        ([_entry(dtype=101)], "dtype 101 is not a numeric"),
        ([_entry(size=4)], r"4 bytes, but shape \(2,\) of dtype 1 takes 8"),
        ([_entry(shape=(-1,))], "negative dimension"),
        ([_entry(crc32c=1 << 32)], "bad offset or crc32c"),
        ([_entry(shard=1)], "shard 1 of 1"),
        ([_entry(shard=-1)], "shard -1 of 1"),
    ],
)
def test_write_index_refuses_a_bad_entry(
    tmp_path: Path, entries: list[Entry], message: str
) -> None:
    prefix = tmp_path / "variables"
    with pytest.raises(ValueError, match=message):
        write_index(prefix, entries)
    assert not bundle.index_path(prefix).exists()


def test_a_bundle_of_one_empty_tensor(tmp_path: Path) -> None:
    prefix = tmp_path / "variables"
    entries = write_bundle(prefix, {"nothing": np.zeros((0,), dtype=np.float32)})
    assert entries == [Entry("nothing", 1, (0,), 0, 0, 0)]
    assert bundle.data_path(prefix).stat().st_size == 0
    assert_same_tensor(
        restore(prefix, ["nothing"], [tf.float32])[0], np.zeros((0,), dtype=np.float32)
    )


def test_a_bundle_in_shards_reads_tensors_among_other_bytes(tmp_path: Path) -> None:
    # Shard 0 is written by the DataWriter; shard 1 is a file with other bytes around and
    # between its tensors, as an input graph file is when it is its own constants' shard.
    prefix = tmp_path / "variables"
    own = {"own/a": np.arange(10, dtype=np.float32), "own/b": np.ones((3, 2), dtype=np.int64)}
    entries = write_bundle(prefix, own)
    bundle.data_path(prefix).rename(bundle.data_path(prefix, 0, 2))
    inside = {
        "in/w": np.linspace(-1, 1, 300, dtype=np.float32).reshape(20, 15),
        "in/v": np.arange(7, dtype=np.uint8),
    }
    layout = bytearray(b"head" * 9)
    for name, array in inside.items():
        entries.append(
            Entry(
                name,
                datatype(array),
                array.shape,
                len(layout),
                array.nbytes,
                google_crc32c.value(array.tobytes()),
                shard=1,
            )
        )
        layout += array.tobytes() + b"between"
    bundle.data_path(prefix, 1, 2).write_bytes(bytes(layout) + b"tail")
    write_index(prefix, entries, shards=2)

    assert bundle.data_path(prefix, 1, 2).name == "variables.data-00001-of-00002"
    reader = tf.train.load_checkpoint(str(prefix))
    tensors = {**own, **inside}
    for name, array in tensors.items():
        assert_same_tensor(reader.get_tensor(name), array)
    names = sorted(tensors)
    restored = restore(prefix, names, [tf.as_dtype(tensors[n].dtype) for n in names])
    for name, got in zip(names, restored, strict=True):
        assert_same_tensor(got, tensors[name])


def test_a_data_path_names_only_shards_that_exist() -> None:
    assert bundle.data_path(Path("v"), 11, 12) == Path("v.data-00011-of-00012")
    for shard, shards in ((1, 1), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match=f"shard {shard} of {shards} does not exist"):
            bundle.data_path(Path("v"), shard, shards)
