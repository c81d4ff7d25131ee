"""A small writer of IDL SAVE (``.sav``) files, for tests of the readers.

IDL writes SAVE files in XDR (big-endian) records; the layout followed here is
the one :func:`scipy.io.readsav` reads (``scipy/io/_idl.py``, after C.
Markwardt's unofficial format description):

* the signature ``SR`` and the record format ``00 04`` (``00 06`` when every
  record body is zlib-compressed, as ``SAVE, /COMPRESS`` does);
* records, each with a 16-byte header: type (int32), offset of the next record
  (two uint32, low word first), 4 unused bytes; then the body, padded to 4 bytes;
* ``TIMESTAMP`` (type 10: 256 unused int32, then date, user, host strings) and
  ``VERSION`` (type 14: format, architecture, OS, IDL release) records;
* one ``VARIABLE`` record (type 2) per variable: its name, a type descriptor
  (type code, flags 4 = array, 32 = structure), an array descriptor (dims in IDL
  order, i.e. the numpy shape reversed: IDL arrays are column-major), a
  structure descriptor (tag types, flags and names, then the array descriptors
  of the array tags and the structure descriptors of the structure tags, each in
  tag order), the marker 7 and the data;
* an ``END_MARKER`` record (type 6).

Scalars of 1- and 2-byte types take a 4-byte word each, as do the elements of
2-byte arrays; strings are a length, the length again, and the bytes.

Values: numpy arrays and scalars (uint8, int16, int32, int64, uint16, uint32,
float32, float64), Python ``int``/``float``/``str``/``bytes``, arrays of
strings, a ``dict`` (one structure; tags in insertion order, nested dicts are
nested structures) or a list of dicts with the same tags and shapes (an array
of structures).

Example
-------
>>> write_sav("x.sav", {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
...                     "s": {"name": "k2v", "ltau": np.zeros(39, np.float32)}})  # doctest: +SKIP
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

_TYPECODES = {
    np.dtype(np.uint8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
    np.dtype(np.float32): 4, np.dtype(np.float64): 5, np.dtype(np.uint16): 12,
    np.dtype(np.uint32): 13, np.dtype(np.int64): 14, np.dtype(np.uint64): 15,
}
_STRING, _STRUCT = 7, 8
_FLAG_ARRAY, _FLAG_STRUCT = 4, 32
_REC_VARIABLE, _REC_END, _REC_TIMESTAMP, _REC_VERSION = 2, 6, 10, 14


def _long(v: int) -> bytes:
    return struct.pack(">i", int(v))


def _pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def _string(s: str) -> bytes:
    """A name/label string: length then the characters, padded."""
    raw = s.encode("latin1")
    return _long(len(raw)) + _pad(raw) if raw else _long(0)


def _string_data(s: str | bytes) -> bytes:
    """A string value: length, length again, the bytes, padded."""
    raw = s.encode("latin1") if isinstance(s, str) else bytes(s)
    return _long(len(raw)) + _long(len(raw)) + _pad(raw) if raw else _long(0)


# ------------------------------------------------------------------ values
def _is_struct(value: Any) -> bool:
    return isinstance(value, Mapping) or (
        isinstance(value, list) and len(value) > 0 and all(isinstance(v, Mapping) for v in value))


def _rows(value: Any) -> list[Mapping[str, Any]]:
    rows = [value] if isinstance(value, Mapping) else list(value)
    tags = [list(r) for r in rows]
    if any(t != tags[0] for t in tags):
        raise ValueError("an array of structures needs the same tags in every element")
    return rows


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, str | bytes):
        return np.array(value, dtype=object)
    arr = np.asarray(value)
    if arr.dtype.kind in "USO":
        return arr.astype(object)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if arr.dtype.kind == "i" and arr.dtype.itemsize == 8 and arr.ndim == 0 \
            and np.iinfo(np.int32).min <= int(arr) <= np.iinfo(np.int32).max \
            and isinstance(value, int):
        return arr.astype(np.int32)       # a Python int: IDL LONG
    if arr.dtype not in _TYPECODES:
        raise TypeError(f"no IDL type for numpy dtype {arr.dtype}")
    return arr


def _typecode(arr: np.ndarray) -> int:
    return _STRING if arr.dtype == object else _TYPECODES[arr.dtype]


def _arraydesc(shape: tuple[int, ...], itemsize: int) -> bytes:
    dims = list(reversed(shape)) or [1]
    if len(dims) > 8:
        raise ValueError("IDL arrays have at most 8 dimensions")
    n = int(np.prod(shape)) if shape else 1
    out = _long(8) + _long(itemsize) + _long(n * itemsize) + _long(n) + _long(len(dims))
    out += _long(0) + _long(0) + _long(8)
    return out + b"".join(_long(d) for d in dims + [1] * (8 - len(dims)))


def _itemsize(code: int) -> int:
    return {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 7: 1, 12: 2, 13: 4, 14: 8, 15: 8}[code]


def _scalar_data(arr: np.ndarray) -> bytes:
    code = _typecode(arr)
    v = arr.item()
    if code == _STRING:
        return _string_data(v)
    if code == 1:
        return _long(1) + struct.pack(">B", v) + b"\0\0\0"
    fmt = {2: ">i", 3: ">i", 4: ">f", 5: ">d", 12: ">I", 13: ">I", 14: ">q", 15: ">Q"}[code]
    return struct.pack(fmt, v)


def _array_data(arr: np.ndarray) -> bytes:
    code = _typecode(arr)
    flat = arr.ravel(order="C")          # C order of numpy = IDL's column-major order
    if code == _STRING:
        return b"".join(_string_data(s) for s in flat)
    if code in (2, 12):                  # 2-byte types: one 4-byte word per element
        return flat.astype(">i4" if code == 2 else ">u4").tobytes()
    raw = flat.astype(flat.dtype.newbyteorder(">")).tobytes()
    if code == 1:
        return _long(len(raw)) + _pad(raw)
    return _pad(raw)


def _structdesc(rows: list[Mapping[str, Any]]) -> bytes:
    first = rows[0]
    tags = list(first)
    descs, names, arrdescs, structdescs = [], [], [], []
    offset = 0
    for tag in tags:
        value = first[tag]
        if _is_struct(value):
            sub = _rows(value)
            flags, code = _FLAG_ARRAY | _FLAG_STRUCT, _STRUCT
            arrdescs.append(_arraydesc((len(sub),) if isinstance(value, list) else (1,), 0))
            structdescs.append(_structdesc(sub))
        else:
            arr = _as_array(value)
            for row in rows[1:]:
                other = _as_array(row[tag])
                if other.shape != arr.shape or _typecode(other) != _typecode(arr):
                    raise ValueError(f"tag {tag!r} differs in shape or type between elements")
            code = _typecode(arr)
            flags = _FLAG_ARRAY if arr.ndim else 0
            if arr.ndim:
                arrdescs.append(_arraydesc(arr.shape, _itemsize(code)))
        descs.append(_long(offset) + _long(code) + _long(flags))
        offset += 8
        names.append(_string(tag.upper()))
    out = _long(9) + _string("") + _long(0) + _long(len(tags)) + _long(offset)
    return out + b"".join(descs) + b"".join(names) + b"".join(arrdescs) + b"".join(structdescs)


def _struct_data(rows: list[Mapping[str, Any]]) -> bytes:
    out = []
    for row in rows:
        for value in row.values():
            if _is_struct(value):
                out.append(_struct_data(_rows(value)))
            else:
                arr = _as_array(value)
                out.append(_array_data(arr) if arr.ndim else _scalar_data(arr))
    return b"".join(out)


def _variable_body(name: str, value: Any) -> bytes:
    body = _string(name.upper())
    if _is_struct(value):
        rows = _rows(value)
        shape = (len(rows),)
        body += _long(_STRUCT) + _long(_FLAG_ARRAY | _FLAG_STRUCT)
        body += _arraydesc(shape, 0) + _structdesc(rows)
        return body + _long(7) + _struct_data(rows)
    arr = _as_array(value)
    code = _typecode(arr)
    if arr.ndim:
        body += _long(code) + _long(_FLAG_ARRAY) + _arraydesc(arr.shape, _itemsize(code))
        return body + _long(7) + _array_data(arr)
    return body + _long(code) + _long(0) + _long(7) + _scalar_data(arr)


# ------------------------------------------------------------------- file
def write_sav(path: str | PathLike, variables: Mapping[str, Any], *, compress: bool = False,
              timestamp: bool = True) -> Path:
    """Write ``variables`` (name → value) to an IDL SAVE file; returns the path.

    Parameters
    ----------
    compress
        zlib-compress every record body (IDL's ``SAVE, /COMPRESS``).
    timestamp
        Write the ``TIMESTAMP`` and ``VERSION`` records IDL writes first.
    """
    records: list[tuple[int, bytes]] = []
    if timestamp:
        records.append((_REC_TIMESTAMP, b"\0" * 1024 + _string("Mon Jan  1 00:00:00 2024")
                        + _string("tester") + _string("localhost")))
        records.append((_REC_VERSION, _long(9) + _string("x86_64") + _string("linux")
                        + _string("8.5")))
    for name, value in variables.items():
        records.append((_REC_VARIABLE, _variable_body(name, value)))
    out = bytearray(b"SR\x00\x06" if compress else b"SR\x00\x04")
    for rectype, body in records:
        if compress:
            body = zlib.compress(body)
        nxt = len(out) + 16 + len(body)
        out += _long(rectype) + struct.pack(">II", nxt % 2**32, nxt // 2**32) + b"\0" * 4 + body
    nxt = len(out) + 16
    out += _long(_REC_END) + struct.pack(">II", nxt % 2**32, nxt // 2**32) + b"\0" * 4
    path = Path(path)
    path.write_bytes(bytes(out))
    return path
