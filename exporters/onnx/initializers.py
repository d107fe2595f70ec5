"""Initializers written to the external data file as a graph builder produces them, so that an export never holds
every weight of the model at once; a small model's data is put back inline at the end (one `model.onnx`).

The file layout is ONNX's own external data (`location`, `offset`, `length` on each TensorProto), the one
`onnx.save_model(save_as_external_data=True)` writes; onnxruntime and `onnx.load` read it alike.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import set_external_data, uses_external_data

from compressor.errors import CompressorError

INLINE_BYTES = 1024  # tensors smaller than this stay in the graph (onnx.save_model's size_threshold)
ALIGN = 4096  # each tensor starts on a page boundary (onnxruntime memory-maps the file)


class InitializerStore:
    """Appends tensor data to `folder/<data_name>` and hands back TensorProtos that point into it."""

    def __init__(self, folder: Path, data_name: str):
        self.folder, self.data_name = folder, data_name
        self.path = folder / data_name
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed in `close`)
        self.size = 0

    def array(self, name: str, values: np.ndarray) -> TensorProto:
        """An initializer of `values` (written out now unless it is tiny)."""
        proto = numpy_helper.from_array(np.ascontiguousarray(values), name)
        return self.proto(proto)

    def proto(self, proto: TensorProto) -> TensorProto:
        """`proto` (with raw_data) moved to the data file unless it is tiny."""
        if len(proto.raw_data) < INLINE_BYTES:
            return proto
        offset = -self.size % ALIGN + self.size
        try:
            self._file.seek(offset)
            self._file.write(proto.raw_data)
        except OSError as err:
            self.close()
            raise CompressorError(
                f"cannot write ONNX weights to {self.path}: {err.strerror or err}",
                fix="free disk space where the artifact is written",
            ) from None
        set_external_data(proto, self.data_name, offset, len(proto.raw_data))
        proto.data_location = TensorProto.EXTERNAL
        proto.ClearField("raw_data")
        self.size = offset + int(dict((e.key, e.value) for e in proto.external_data)["length"])
        return proto

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def inline(self, tensors: list[TensorProto]) -> None:
        """Put every tensor's data back into the graph and delete the data file (for a model small enough to be
        one protobuf file)."""
        self.close()
        with open(self.path, "rb") as f:
            for t in tensors:
                if not uses_external_data(t):
                    continue
                info = {e.key: e.value for e in t.external_data}
                f.seek(int(info["offset"]))
                t.raw_data = f.read(int(info["length"]))
                del t.external_data[:]
                t.data_location = TensorProto.DEFAULT
        os.remove(self.path)
