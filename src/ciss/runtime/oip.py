"""The Open Inference Protocol v2 tensor codec: JSON tensors and Triton's binary-data extension.

A request body is a JSON header optionally followed by raw little-endian tensor bytes; the
header's length then travels in ``Inference-Header-Content-Length`` and each binary input says
its size in ``parameters.binary_data_size`` (Triton's binary tensor extension, which stock
``tritonclient.http`` uses by default). Responses mirror that: an output asked for in binary
(``parameters.binary_data`` on the output, or ``binary_data_output`` on the request) is appended
raw after the JSON header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

HEADER = "Inference-Header-Content-Length"

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
NAMES = {v: k for k, v in DATATYPES.items()}


class ProtocolError(ValueError):
    """A malformed or wrongly typed inference request (HTTP 400)."""


@dataclass
class InferRequest:
    """A decoded ``/infer`` request.

    Attributes:
        id: the client's request id ("" when absent), echoed in the response.
        inputs: tensor name -> array (shape and dtype as the request declared them).
        outputs: requested output name -> wants binary; None = every output.
        binary_default: the request's ``binary_data_output`` (applies when outputs is None).
    """

    id: str
    inputs: dict[str, np.ndarray]
    outputs: dict[str, bool] | None = None
    binary_default: bool = False
    parameters: dict = field(default_factory=dict)


def _obj(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return value


def _shape(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                              and d >= 0 for d in value):
        raise ProtocolError(f"{what}.shape must be a list of non-negative integers")
    return tuple(value)


def _flatten(data) -> list:
    """Row-major flattening of nested lists (OIP accepts both flat and nested ``data``)."""
    if not isinstance(data, list):
        return [data]
    if data and isinstance(data[0], list):
        return [x for part in data for x in _flatten(part)]
    return data


def _json_tensor(spec: dict, what: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if "data" not in spec:
        raise ProtocolError(f"{what} has neither 'data' nor parameters.binary_data_size")
    flat = _flatten(spec["data"])
    if len(flat) != int(np.prod(shape)):
        raise ProtocolError(f"{what}: shape {list(shape)} needs {int(np.prod(shape))} values, "
                            f"data has {len(flat)}")
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        if not all(isinstance(x, int) and not isinstance(x, bool) and info.min <= x <= info.max
                   for x in flat):
            raise ProtocolError(f"{what}: data must be integers in [{info.min}, {info.max}] for "
                                f"{NAMES[dtype]}")
    elif dtype.kind == "b":
        if not all(isinstance(x, bool) for x in flat):
            raise ProtocolError(f"{what}: data must be booleans for BOOL")
    elif not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in flat):
        raise ProtocolError(f"{what}: data must be numbers for {NAMES[dtype]}")
    return np.asarray(flat, dtype=dtype).reshape(shape)


def parse_infer_request(body: bytes, header_length: int | None,
                        max_elements: int) -> InferRequest:
    """Decode an OIP ``/infer`` body (JSON, or JSON + binary tensors).

    Args:
        body: the whole request body.
        header_length: the ``Inference-Header-Content-Length`` value, None for pure JSON.
        max_elements: refuse any tensor with more elements than this before allocating it.

    Raises:
        ProtocolError: naming the tensor or field that is wrong.
    """
    if header_length is None:
        header_length = len(body)
    if not 0 < header_length <= len(body):
        raise ProtocolError(f"{HEADER} is {header_length} but the body has {len(body)} bytes")
    try:
        doc = json.loads(body[:header_length])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"request header is not valid JSON ({exc})") from exc
    doc = _obj(doc, "the request")
    params = _obj(doc.get("parameters", {}), "parameters")
    specs = doc.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise ProtocolError("'inputs' must be a non-empty list of tensors")
    offset = header_length
    inputs: dict[str, np.ndarray] = {}
    for i, spec in enumerate(specs):
        spec = _obj(spec, f"inputs[{i}]")
        name = spec.get("name")
        if not isinstance(name, str):
            raise ProtocolError(f"inputs[{i}].name must be a string")
        what = f"input '{name}'"
        datatype = spec.get("datatype")
        if datatype not in DATATYPES:
            raise ProtocolError(f"{what}: unknown datatype {datatype!r} "
                                f"(one of {', '.join(DATATYPES)})")
        dtype = DATATYPES[datatype]
        shape = _shape(spec.get("shape"), what)
        n = int(np.prod(shape))
        if n > max_elements:
            raise ProtocolError(f"{what}: {n} elements exceeds the limit of {max_elements}")
        size = _obj(spec.get("parameters", {}), f"{what}.parameters").get("binary_data_size")
        if size is None:
            inputs[name] = _json_tensor(spec, what, dtype, shape)
            continue
        if not isinstance(size, int) or size != n * dtype.itemsize:
            raise ProtocolError(f"{what}: binary_data_size {size} does not match shape "
                                f"{list(shape)} of {datatype} ({n * dtype.itemsize} bytes)")
        if offset + size > len(body):
            raise ProtocolError(f"{what}: the body ends before its {size} binary bytes")
        inputs[name] = np.frombuffer(body, dtype=dtype.newbyteorder("<"), count=n,
                                     offset=offset).reshape(shape).astype(dtype, copy=False)
        offset += size
    if offset != len(body):
        raise ProtocolError(f"{len(body) - offset} unexpected bytes after the binary tensors")
    outputs = None
    if "outputs" in doc:
        if not isinstance(doc["outputs"], list):
            raise ProtocolError("'outputs' must be a list")
        outputs = {}
        for i, spec in enumerate(doc["outputs"]):
            spec = _obj(spec, f"outputs[{i}]")
            if not isinstance(spec.get("name"), str):
                raise ProtocolError(f"outputs[{i}].name must be a string")
            p = _obj(spec.get("parameters", {}), f"outputs[{i}].parameters")
            outputs[spec["name"]] = bool(p.get("binary_data", params.get("binary_data_output",
                                                                         False)))
    rid = doc.get("id", "")
    if not isinstance(rid, str):
        raise ProtocolError("'id' must be a string")
    return InferRequest(rid, inputs, outputs, bool(params.get("binary_data_output", False)),
                        params)


def encode_infer_response(model_name: str, version: str, request: InferRequest,
                          outputs: dict[str, np.ndarray], parameters: dict | None = None
                          ) -> tuple[bytes, int | None]:
    """The response body and, when binary tensors follow the JSON, the header's length.
    ``parameters``: the response's own (OIP: values are strings, numbers or booleans)."""
    wanted = request.outputs if request.outputs is not None else {
        name: request.binary_default for name in outputs}
    tensors, blobs = [], []
    for name, binary in wanted.items():
        arr = np.ascontiguousarray(outputs[name])
        spec = {"name": name, "datatype": NAMES[arr.dtype], "shape": list(arr.shape)}
        if binary:
            raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            spec["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            spec["data"] = arr.ravel().tolist()
        tensors.append(spec)
    doc = {"model_name": model_name, "model_version": version, "outputs": tensors}
    if request.id:
        doc["id"] = request.id
    if parameters:
        doc["parameters"] = parameters
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
