"""The Sparkplug B ``Payload`` protobuf message, read straight off the wire (and the one message
a host application writes: the rebirth request).

Only what the adapter maps is decoded: the payload's ``timestamp``, ``seq``, ``uuid`` and
``body``, and per metric ``name``, ``alias``, ``timestamp``, ``datatype``, ``is_historical``,
``is_null`` and the scalar value fields (``int_value``, ``long_value``, ``float_value``,
``double_value``, ``boolean_value``, ``string_value``, ``bytes_value``). Every other field
(metadata, property sets, data sets, templates, extensions) is skipped by its wire type, as
protobuf readers must. Field numbers and datatype codes are those of ``sparkplug_b.proto``
(Eclipse Sparkplug 3.0, the ``org.eclipse.tahu.protobuf`` package).

Bytes that are not such a message (truncated, a wire type that cannot be, a varint longer than
ten bytes, a string that is not UTF-8) raise ``PayloadError`` with what was wrong and where.

Integers: ``int_value`` is a uint32 and ``long_value`` a uint64 on the wire; a signed datatype
is its two's complement. Encoders differ in how they widen a negative Int8/16/32 (Eclipse Tahu
sign-extends to 32 bits, pysparkplug adds 2**bits), so both forms are read: the same number. A
value that is neither (an Int8 of 300, a UInt8 of 256) raises ``PayloadError``, never masked into
another number. An Int64 in ``int_value`` (32 bits) takes its sign from bit 31.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Datatype codes of sparkplug_b.proto (enum DataType).
INT8, INT16, INT32, INT64 = 1, 2, 3, 4
UINT8, UINT16, UINT32, UINT64 = 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN, STRING, DATETIME, TEXT, UUID = 9, 10, 11, 12, 13, 14, 15
BYTES, FILE = 17, 18
DATATYPE_NAMES = {
    INT8: "Int8", INT16: "Int16", INT32: "Int32", INT64: "Int64", UINT8: "UInt8",
    UINT16: "UInt16", UINT32: "UInt32", UINT64: "UInt64", FLOAT: "Float", DOUBLE: "Double",
    BOOLEAN: "Boolean", STRING: "String", DATETIME: "DateTime", TEXT: "Text", UUID: "UUID",
    16: "DataSet", BYTES: "Bytes", FILE: "File", 19: "Template",
}  # fmt: skip
_SIGNED_BITS = {INT8: 8, INT16: 16, INT32: 32, INT64: 64}
_UNSIGNED_BITS = {UINT8: 8, UINT16: 16, UINT32: 32, UINT64: 64, DATETIME: 64}
_STRINGS = frozenset({STRING, TEXT, UUID})

# Wire types (protobuf encoding).
_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = 0, 1, 2, 3, 4, 5

Value = bool | int | float | str | bytes


class PayloadError(ValueError):
    """The bytes are not a Sparkplug B payload."""


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric as sent. ``raw`` is the value field as on the wire (``None`` when absent);
    ``value`` reads it as a datatype (the metric's own, or the birth's when a DATA message
    leaves it out)."""

    name: str | None = None
    alias: int | None = None
    timestamp: int | None = None  # milliseconds since the Unix epoch, UTC
    datatype: int | None = None
    is_historical: bool = False
    is_null: bool = False
    raw: Value | None = None
    raw_field: int | None = None  # which value field (10 int_value … 16 bytes_value)

    def value(self, datatype: int | None = None) -> Value | None:
        """The value as ``datatype`` (default: the metric's), ``None`` when null or absent.
        Raises ``PayloadError`` when the value field does not fit the datatype."""
        if self.is_null or self.raw is None:
            return None
        kind = datatype if datatype is not None else self.datatype
        raw, field = self.raw, self.raw_field
        if kind in _SIGNED_BITS and field in (10, 11) and isinstance(raw, int):
            # The datatype's width, or the field's when narrower (an Int64 in int_value).
            width = 32 if field == 10 else 64
            bits = min(_SIGNED_BITS[kind], width)
            if raw < 1 << bits:  # its own width's two's complement (pysparkplug)
                return raw - (1 << bits) if raw >> (bits - 1) else raw
            if raw >= (1 << width) - (1 << (bits - 1)):  # sign-extended to the field (Tahu)
                return raw - (1 << width)
            name = DATATYPE_NAMES[kind]
            raise PayloadError(f"metric {self.name or self.alias!r}: {raw} is not an {name}")
        if kind in _UNSIGNED_BITS and field in (10, 11) and isinstance(raw, int):
            if raw >> _UNSIGNED_BITS[kind]:
                name = DATATYPE_NAMES[kind]
                raise PayloadError(f"metric {self.name or self.alias!r}: {raw} is not a {name}")
            return raw
        if kind == BOOLEAN and field == 14:
            return bool(raw)
        if (kind == FLOAT and field == 12) or (kind == DOUBLE and field == 13):
            return raw
        if kind in _STRINGS and field == 15:
            return raw
        if kind in (BYTES, FILE) and field == 16:
            return raw
        if kind is None:
            return raw  # no datatype anywhere: the field says what it is
        name = DATATYPE_NAMES.get(kind, f"datatype {kind}")
        raise PayloadError(f"metric {self.name or self.alias!r}: a {name} in field {field}")


@dataclass(frozen=True, slots=True)
class Payload:
    timestamp: int | None = None  # milliseconds since the Unix epoch, UTC
    metrics: tuple[Metric, ...] = ()
    seq: int | None = None
    uuid: str | None = None
    body: bytes | None = None

    def metric(self, name: str) -> Metric | None:
        return next((m for m in self.metrics if m.name == name), None)


class _Reader:
    __slots__ = ("data", "end", "pos", "what")

    def __init__(self, data: bytes, start: int, end: int, what: str) -> None:
        self.data, self.pos, self.end, self.what = data, start, end, what

    def more(self) -> bool:
        return self.pos < self.end

    def varint(self) -> int:
        result = shift = 0
        for _ in range(10):
            if self.pos >= self.end:
                raise PayloadError(f"{self.what}: truncated varint at byte {self.pos}")
            byte = self.data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result & 0xFFFF_FFFF_FFFF_FFFF
            shift += 7
        raise PayloadError(f"{self.what}: varint longer than 10 bytes at byte {self.pos}")

    def take(self, size: int) -> int:
        """Skip ``size`` bytes; where they start."""
        start = self.pos
        if size < 0 or start + size > self.end:
            raise PayloadError(f"{self.what}: truncated at byte {start} ({size} bytes announced)")
        self.pos += size
        return start

    def field(self) -> tuple[int, int]:
        key = self.varint()
        number, wire_type = key >> 3, key & 7
        if number == 0 or wire_type in (_START_GROUP, _END_GROUP) or wire_type > _FIXED32:
            raise PayloadError(
                f"{self.what}: field {number} with wire type {wire_type} at byte {self.pos}"
            )
        return number, wire_type

    def skip(self, wire_type: int) -> None:
        if wire_type == _VARINT:
            self.varint()
        elif wire_type == _FIXED64:
            self.take(8)
        elif wire_type == _FIXED32:
            self.take(4)
        else:
            self.take(self.varint())

    def text(self) -> str:
        start = self.take(self.varint())
        try:
            return self.data[start : self.pos].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError(f"{self.what}: a string that is not UTF-8 at byte {start}") from exc

    def blob(self) -> bytes:
        start = self.take(self.varint())
        return bytes(self.data[start : self.pos])


def _expect(number: int, wire_type: int, wanted: int, what: str) -> None:
    if wire_type != wanted:
        raise PayloadError(f"{what}: field {number} has wire type {wire_type}, not {wanted}")


def _metric(data: bytes, start: int, end: int, index: int) -> Metric:
    what = f"metric {index}"
    reader = _Reader(data, start, end, what)
    name: str | None = None
    numbers: dict[int, int] = {}  # alias, timestamp, datatype, is_historical, is_null
    raw: Value | None = None
    raw_field: int | None = None
    while reader.more():
        number, wire_type = reader.field()
        if number == 1 and wire_type == _LENGTH:
            name = reader.text()
        elif number in (2, 3, 4, 5, 7) and wire_type == _VARINT:
            numbers[number] = reader.varint()
        elif number in (10, 11, 14):
            _expect(number, wire_type, _VARINT, what)
            raw, raw_field = reader.varint(), number
            if number == 10:
                raw &= 0xFFFF_FFFF
            elif number == 14:
                raw = bool(raw)
        elif number == 12:
            _expect(number, wire_type, _FIXED32, what)
            at = reader.take(4)
            raw, raw_field = struct.unpack_from("<f", data, at)[0], number
        elif number == 13:
            _expect(number, wire_type, _FIXED64, what)
            at = reader.take(8)
            raw, raw_field = struct.unpack_from("<d", data, at)[0], number
        elif number == 15:
            _expect(number, wire_type, _LENGTH, what)
            raw, raw_field = reader.text(), number
        elif number == 16:
            _expect(number, wire_type, _LENGTH, what)
            raw, raw_field = reader.blob(), number
        elif number in (1, 2, 3, 4, 5, 7):
            raise PayloadError(f"{what}: field {number} has the wrong wire type {wire_type}")
        else:
            # 6 is_transient, 8 metadata, 9 properties, 17-19 data set, template, extension:
            # nothing the adapter maps. A value field among them resets any earlier one (a
            # oneof: the last one read wins).
            if number in (17, 18, 19):
                raw = raw_field = None
            reader.skip(wire_type)
    return Metric(
        name=name,
        alias=numbers.get(2),
        timestamp=numbers.get(3),
        datatype=numbers.get(4),
        is_historical=bool(numbers.get(5)),
        is_null=bool(numbers.get(7)),
        raw=raw,
        raw_field=raw_field,
    )


def decode_payload(data: bytes) -> Payload:
    """Read a Sparkplug B payload. Raises ``PayloadError``."""
    reader = _Reader(data, 0, len(data), "payload")
    timestamp = seq = None
    uuid: str | None = None
    body: bytes | None = None
    metrics: list[Metric] = []
    while reader.more():
        number, wire_type = reader.field()
        if number == 1:
            _expect(number, wire_type, _VARINT, "payload")
            timestamp = reader.varint()
        elif number == 2:
            _expect(number, wire_type, _LENGTH, "payload")
            size = reader.varint()
            start = reader.take(size)
            metrics.append(_metric(data, start, start + size, len(metrics)))
        elif number == 3:
            _expect(number, wire_type, _VARINT, "payload")
            seq = reader.varint()
        elif number == 4:
            _expect(number, wire_type, _LENGTH, "payload")
            uuid = reader.text()
        elif number == 5:
            _expect(number, wire_type, _LENGTH, "payload")
            body = reader.blob()
        else:
            reader.skip(wire_type)  # an extension
    return Payload(timestamp, tuple(metrics), seq, uuid, body)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_rebirth_request(timestamp_ms: int) -> bytes:
    """An NCMD payload asking an edge node to publish its births again: one Boolean metric
    ``Node Control/Rebirth`` = true (Sparkplug 3.0, "Rebirth Request")."""
    name = b"Node Control/Rebirth"
    metric = (
        b"\x0a" + _varint(len(name)) + name  # 1 name
        + b"\x18" + _varint(timestamp_ms)  # 3 timestamp
        + b"\x20" + _varint(BOOLEAN)  # 4 datatype
        + b"\x70\x01"  # 14 boolean_value = true
    )  # fmt: skip
    return b"\x08" + _varint(timestamp_ms) + b"\x12" + _varint(len(metric)) + metric
