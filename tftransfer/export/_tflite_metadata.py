"""Class names inside a `.tflite` file, the way TFLite model metadata keeps them.

The TFLite Support metadata format (the one MediaPipe Tasks and the TFLite
Task Library read): the model's flatbuffer gets a `TFLITE_METADATA` entry whose
buffer is a `ModelMetadata` flatbuffer (file identifier `M001`), and the files
it names (here `labels.txt`, type `TENSOR_AXIS_LABELS`, on the output tensor)
are appended to the model as an uncompressed zip archive. The interpreter
ignores the bytes after the model; `zipfile` and MediaPipe read the archive.

`tflite-support`, the package with the official writer, cannot be installed
beside TensorFlow 2.21 (it pins `protobuf<4`), so this module writes the few
tables an image classifier needs with the `flatbuffers` builder, using the slot
numbers of `metadata_schema.fbs`; the model flatbuffer itself is edited with
the schema classes that ship in `ai-edge-litert`.

Example:
    >>> content = add_labels(flatbuffer, ["cat", "dog"], float_input=True)
    >>> read_labels(content)
    ['cat', 'dog']
"""

import io
import zipfile

import flatbuffers
from ai_edge_litert import schema_py_generated as schema
from flatbuffers import table as fb_table

METADATA_NAME = b"TFLITE_METADATA"
MODEL_IDENTIFIER = b"TFL3"
METADATA_IDENTIFIER = b"M001"
LABELS_NAME = "labels.txt"
PARSER_VERSION = "1.0.0"  # no field here is newer than metadata schema 1.0.0
TENSOR_AXIS_LABELS = 2  # AssociatedFileType
FEATURE_PROPERTIES, IMAGE_PROPERTIES = 1, 2  # ContentProperties union
NORMALIZATION_OPTIONS = 1  # ProcessUnitOptions union
RGB, GRAYSCALE = 1, 2  # ColorSpaceType


def add_labels(flatbuffer, class_names, *, float_input, channels=3, name="tftransfer model"):
    """Returns `flatbuffer` with image-classifier metadata and `labels.txt` inside.

    Args:
        flatbuffer: Bytes of a converted `.tflite` model without metadata.
        class_names: One name per output.
        float_input: Whether the input tensor is float (then the metadata says
            "normalize with mean 0, std 1", i.e. raw 0-255 pixels go in).
        channels: 3 (RGB) or 1 (grayscale); other counts get no color space.
        name: The model name in the metadata.
    """
    model = compact(schema.ModelT.InitFromPackedBuf(bytearray(flatbuffer), 0))
    meta = _model_metadata(name, float_input, channels)
    model.buffers.append(_buffer(meta))
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != METADATA_NAME] + [entry]
    builder = SharingBuilder(len(flatbuffer) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=MODEL_IDENTIFIER)
    out = io.BytesIO(bytes(builder.Output()))
    out.seek(0, io.SEEK_END)
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(LABELS_NAME, "\n".join(class_names) + "\n")
    return out.getvalue()


class SharingBuilder(flatbuffers.Builder):
    """A `flatbuffers.Builder` that writes each distinct array once.

    The schema classes pack every tensor's quantization parameters, shape and
    operator indices as arrays of their own; identical ones (the all-zero int64
    zero points of a weight and its bias, a shape several tensors share) are
    written once and referenced from every table that holds them, as
    `Builder.CreateSharedString` does for strings. Flatbuffers allows any number
    of references to one vector; readers see the same values. Byte arrays (the
    buffers of weights) start on 16-byte boundaries, as the converter writes
    them, so kernels can read them in place.
    """

    BUFFER_ALIGNMENT = 16

    def __init__(self, initial_size=1024):
        super().__init__(initial_size)
        self._arrays = {}

    def CreateNumpyVector(self, x):  # noqa: N802 (flatbuffers' name)
        key = (x.dtype.str, x.shape, x.tobytes())
        if key not in self._arrays:
            self._arrays[key] = (self._byte_vector(x) if x.dtype == "uint8"
                                 else super().CreateNumpyVector(x))
        return self._arrays[key]

    def _byte_vector(self, x):
        payload = x.tobytes()
        self.StartVector(1, len(payload), self.BUFFER_ALIGNMENT)
        self.head -= len(payload)
        self.Bytes[self.head:self.head + len(payload)] = payload
        return self.EndVector()


def compact(model):
    """Drops what the interpreter never reads from a `schema.ModelT`, in place.

    What TF's `flatbuffer_utils.strip_strings` drops (the model description,
    subgraph names, tensor names; the converter's fused names such as
    `finetuner_1/backbone_1/relu1_1/Relu;...;bn1_1/batchnorm/sub` take 1.6 kB,
    5% of a small int8 model), except the signature defs, which
    `get_signature_runner`, `tftransfer.predict` and MediaPipe read: they are
    kept, and the signature's input and output tensors are named after their
    keys (`images`, `probabilities`). The empty buffers of activation tensors
    are merged into buffer 0 (the schema's "no data" buffer). Weights,
    quantization and operators are untouched: the outputs are bit-identical.
    """
    model.description = None
    for subgraph in model.subgraphs:
        subgraph.name = None
        for tensor in subgraph.tensors:
            tensor.name = None
    for signature in model.signatureDefs or []:
        for entry in (signature.inputs or []) + (signature.outputs or []):
            model.subgraphs[signature.subgraphIndex].tensors[entry.tensorIndex].name = entry.name
    _drop_empty_buffers(model)
    return model


def _drop_empty_buffers(model):
    keep = sorted({0} | {m.buffer for m in model.metadata or []}
                  | {t.buffer for g in model.subgraphs for t in g.tensors
                     if _has_data(model.buffers[t.buffer])})
    index = {old: new for new, old in enumerate(keep)}
    for tensor in (t for g in model.subgraphs for t in g.tensors):
        tensor.buffer = index.get(tensor.buffer, 0)
    for entry in model.metadata or []:
        entry.buffer = index[entry.buffer]
    model.buffers = [model.buffers[old] for old in keep]


def _has_data(buffer):
    # `offset` is set instead of `data` in models over 2 GB (data after the flatbuffer).
    return bool(buffer.offset) or (buffer.data is not None and len(buffer.data) > 0)


def read_labels(content):
    """The class names kept in a `.tflite` file's metadata, or None.

    Args:
        content: The bytes of a `.tflite` file, or its path.
    """
    if not isinstance(content, (bytes, bytearray)):
        with open(content, "rb") as f:
            content = f.read()
    names = label_file_names(content)
    if not names:
        return None
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        return archive.read(names[0]).decode().splitlines()


def label_file_names(content):
    """Names of the `TENSOR_AXIS_LABELS` files of the output tensors' metadata."""
    model = schema.Model.GetRootAs(content, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == METADATA_NAME:
            data = model.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
            return _axis_label_files(data)
    return []


# ------------------------------------------------------------------ writing


def _buffer(data):
    buffer = schema.BufferT()
    buffer.data = bytearray(data)
    return buffer


def _model_metadata(name, float_input, channels):
    """A `ModelMetadata` flatbuffer: one subgraph, image in, labelled scores out."""
    b = flatbuffers.Builder(512)
    subgraph = _table(b, {2: _vector(b, [_input_tensor(b, float_input, channels)]),
                          3: _vector(b, [_output_tensor(b)])})
    root = _table(b, {0: b.CreateString(name), 3: _vector(b, [subgraph]),
                      7: b.CreateString(PARSER_VERSION)})
    b.Finish(root, file_identifier=METADATA_IDENTIFIER)
    return bytes(b.Output())


def _input_tensor(b, float_input, channels):
    space = {3: RGB, 1: GRAYSCALE}.get(channels, 0)
    properties = _table(b, {}, scalars={0: space})  # ImageProperties.color_space
    content = _table(b, {1: properties}, scalars={0: IMAGE_PROPERTIES})
    fields = {0: b.CreateString("image"), 3: content, 5: _stats(b, 255.0, 0.0)}
    if float_input:  # MediaPipe needs normalization for float input: (x - 0) / 1
        options = _table(b, {0: _floats(b, [0.0]), 1: _floats(b, [1.0])})
        fields[4] = _vector(b, [_table(b, {1: options}, scalars={0: NORMALIZATION_OPTIONS})])
    return _table(b, fields)


def _output_tensor(b):
    labels = _table(b, {0: b.CreateString(LABELS_NAME),
                        1: b.CreateString("Class names, one per output.")},
                    scalars={2: TENSOR_AXIS_LABELS})
    content = _table(b, {1: _table(b, {})}, scalars={0: FEATURE_PROPERTIES})
    return _table(b, {0: b.CreateString("probability"), 3: content,
                      5: _stats(b, 1.0, 0.0), 6: _vector(b, [labels])})


def _stats(b, high, low):
    return _table(b, {0: _floats(b, [high]), 1: _floats(b, [low])})


def _floats(b, values):
    b.StartVector(4, len(values), 4)
    for value in reversed(values):
        b.PrependFloat32(value)
    return b.EndVector()


def _vector(b, offsets):
    b.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        b.PrependUOffsetTRelative(offset)
    return b.EndVector()


def _table(b, offsets, scalars=None):
    """A table with offset fields `{slot: offset}` and byte fields `{slot: value}`."""
    slots = max([*offsets, *(scalars or {}), -1]) + 1
    b.StartObject(slots)
    for slot, offset in offsets.items():
        b.PrependUOffsetTRelativeSlot(slot, offset, 0)
    for slot, value in (scalars or {}).items():
        b.PrependInt8Slot(slot, value, 0)
    return b.EndObject()


# ------------------------------------------------------------------ reading


def _axis_label_files(data):
    """`TENSOR_AXIS_LABELS` file names of subgraph 0's output tensors."""
    root = _root(data)
    found = []
    for subgraph in _tables(root, 3):
        for tensor in _tables(subgraph, 3):
            for associated in _tables(tensor, 6):
                if _byte(associated, 2) == TENSOR_AXIS_LABELS:
                    found.append(_string(associated, 0))
    return found


def _root(data):
    buf = bytearray(data)
    return fb_table.Table(buf, flatbuffers.encode.Get(flatbuffers.packer.uoffset, buf, 0))


def _tables(tab, slot):
    offset = tab.Offset(4 + 2 * slot)
    if not offset:
        return []
    start = tab.Vector(offset)
    return [fb_table.Table(tab.Bytes, tab.Indirect(start + 4 * i))
            for i in range(tab.VectorLen(offset))]


def _byte(tab, slot):
    offset = tab.Offset(4 + 2 * slot)
    return tab.Get(flatbuffers.number_types.Int8Flags, tab.Pos + offset) if offset else 0


def _string(tab, slot):
    offset = tab.Offset(4 + 2 * slot)
    return tab.String(tab.Pos + offset).decode() if offset else None
