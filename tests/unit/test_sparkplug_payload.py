"""The Sparkplug B payload decoder against payloads encoded by pysparkplug (an independent
implementation, with the protobuf code generated from ``sparkplug_b.proto``)."""

from __future__ import annotations

from typing import Any

import pytest
from pysparkplug import DataType, DBirth, DData, Metric, NBirth, NCmd, NData, NDeath
from pysparkplug._protobuf import Payload as PbPayload

from adapters.machines.sparkplug_payload import (
    PayloadError,
    decode_payload,
    encode_rebirth_request,
)

T = 1_764_000_000_123  # a timestamp in milliseconds


@pytest.mark.parametrize(
    ("datatype", "value"),
    [
        (DataType.BOOLEAN, True),
        (DataType.BOOLEAN, False),
        (DataType.INT8, -128),
        (DataType.INT8, 127),
        (DataType.INT16, -2),
        (DataType.INT32, -2_147_483_648),
        (DataType.INT64, -9_223_372_036_854_775_808),
        (DataType.INT64, 42),
        (DataType.UINT8, 255),
        (DataType.UINT16, 65_535),
        (DataType.UINT32, 4_294_967_295),
        (DataType.UINT64, 18_446_744_073_709_551_615),
        (DataType.FLOAT, 1.5),
        (DataType.DOUBLE, -0.1),
        (DataType.STRING, "O1234 (ROUGH)"),
        (DataType.TEXT, "ünïcode ✓"),
        (DataType.UUID, "0b5f3b8e-6e6a-4c1c-9b1e-8a0f2b4c6d7e"),
        (DataType.BYTES, b"\x00\xff"),
    ],
)
def test_every_mapped_datatype_reads_as_pysparkplug_wrote_it(
    datatype: DataType, value: Any
) -> None:
    metric = Metric(timestamp=T + 1, name="M", datatype=datatype, value=value, alias=7)
    payload = decode_payload(NBirth(timestamp=T, seq=0, metrics=(metric,)).encode())
    (read,) = payload.metrics
    assert (read.name, read.alias, read.timestamp, read.datatype) == ("M", 7, T + 1, datatype)
    assert read.value() == value
    assert type(read.value()) is type(value)


def test_payload_fields_seq_timestamp_uuid_and_body() -> None:
    pb = PbPayload()
    pb.timestamp, pb.seq, pb.uuid, pb.body = T, 255, "urn:example:v1", b"\x01\x02"
    payload = decode_payload(pb.SerializeToString())
    assert (payload.timestamp, payload.seq, payload.uuid, payload.body) == (
        T, 255, "urn:example:v1", b"\x01\x02",
    )  # fmt: skip
    assert payload.metrics == ()


def test_data_by_alias_reads_with_the_births_datatype() -> None:
    # DATA may leave out the name and the datatype: the birth gave both.
    data = NData(
        timestamp=T,
        seq=4,
        metrics=(Metric(timestamp=T, name=None, alias=3, datatype=DataType.INT16, value=-5),),
    ).encode(include_dtypes=False)
    (read,) = decode_payload(data).metrics
    assert (read.name, read.alias, read.datatype) == (None, 3, None)
    assert read.value(DataType.INT16) == -5  # two's complement of the 16-bit value
    assert read.value(DataType.UINT16) == 65_531


def test_negative_small_ints_as_tahu_writes_them() -> None:
    # Eclipse Tahu sign-extends an Int8 -1 to 32 bits (0xFFFFFFFF); pysparkplug writes 255.
    pb = PbPayload()
    metric = pb.metrics.add()
    metric.name, metric.datatype, metric.int_value = "M", DataType.INT8, 0xFFFF_FFFF
    assert decode_payload(pb.SerializeToString()).metrics[0].value() == -1


@pytest.mark.parametrize(
    ("datatype", "field", "raw", "problem"),
    [
        (DataType.INT8, "int_value", 300, "300 is not an Int8"),
        (DataType.INT8, "int_value", 0xFFFF_0000, "4294901760 is not an Int8"),
        (DataType.UINT8, "int_value", 256, "256 is not a UInt8"),
        (DataType.UINT16, "long_value", 1 << 40, "1099511627776 is not a UInt16"),
    ],
)
def test_a_value_beyond_its_datatype_is_an_error_not_another_number(
    datatype: DataType, field: str, raw: int, problem: str
) -> None:
    pb = PbPayload()
    metric = pb.metrics.add()
    metric.name, metric.datatype = "M", datatype
    setattr(metric, field, raw)
    with pytest.raises(PayloadError, match=problem):
        decode_payload(pb.SerializeToString()).metrics[0].value()


def test_an_int64_in_int_value_keeps_its_sign() -> None:
    pb = PbPayload()
    metric = pb.metrics.add()
    metric.name, metric.datatype, metric.int_value = "M", DataType.INT64, 0xFFFF_FFFE
    assert decode_payload(pb.SerializeToString()).metrics[0].value() == -2


def test_null_metrics_have_no_value() -> None:
    metric = Metric(timestamp=T, name="Program", datatype=DataType.STRING, value=None)
    (read,) = decode_payload(DData(timestamp=T, seq=1, metrics=(metric,)).encode()).metrics
    assert read.is_null
    assert read.value() is None


def test_ndeath_bdseq_and_historical_flag() -> None:
    bd_seq = Metric(timestamp=T, name="bdSeq", datatype=DataType.INT64, value=9)
    death = decode_payload(NDeath(timestamp=T, bd_seq_metric=bd_seq).encode())
    assert death.seq is None
    bd = death.metric("bdSeq")
    assert bd is not None and bd.value() == 9
    old = Metric(timestamp=T - 60_000, name="Count", datatype=DataType.UINT32, value=3,
                 is_historical=True)  # fmt: skip
    (read,) = decode_payload(DBirth(timestamp=T, seq=1, metrics=(old,)).encode()).metrics
    assert read.is_historical and read.timestamp == T - 60_000


def test_nested_and_unknown_fields_are_skipped() -> None:
    pb = PbPayload()
    pb.timestamp = T
    metric = pb.metrics.add()
    metric.name, metric.datatype, metric.long_value = "Count", DataType.UINT64, 12
    metric.metadata.content_type = "text/plain"  # field 8, a nested message
    metric.metadata.size = 3
    metric.properties.keys.append("engUnit")  # field 9, a property set
    metric.properties.values.add().string_value = "parts"
    metric.is_transient = True  # field 6
    template = pb.metrics.add()  # a metric holding a template (field 18), nothing we map
    template.name, template.datatype = "UDT", DataType.TEMPLATE
    template.template_value.version = "v1"
    raw = pb.SerializeToString()
    # An unknown payload field (an extension, 6) of every wire type, appended.
    raw += b"\x30\x05" + b"\x39" + bytes(8) + b"\x32\x02hi" + b"\x3d" + bytes(4)
    payload = decode_payload(raw)
    count, udt = payload.metrics
    assert (count.name, count.value()) == ("Count", 12)
    assert udt.name == "UDT" and udt.value() is None


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"\x08", "truncated varint"),
        (b"\x12\x05\x0a", "truncated at byte"),
        (b"\x08" + b"\xff" * 11, "varint longer than 10 bytes"),
        (b"\x0b", "wire type 3"),  # a group: not in proto3, not Sparkplug
        (b"\x12\x03\x0a\x01\xff", "not UTF-8"),
        (b"\x0a\x01a", "field 1 has wire type 2, not 0"),
        (b"\x12\x02\x60\x01", "metric 0: field 12 has wire type 0, not 5"),
    ],
)
def test_bytes_that_are_not_a_payload_raise_a_clear_error(raw: bytes, problem: str) -> None:
    with pytest.raises(PayloadError, match=problem):
        decode_payload(raw)


def test_truncating_a_real_payload_anywhere_raises_or_reads_less() -> None:
    birth = NBirth(
        timestamp=T,
        seq=0,
        metrics=(
            Metric(timestamp=T, name="Running", datatype=DataType.BOOLEAN, value=True, alias=1),
            Metric(timestamp=T, name="Program", datatype=DataType.STRING, value="O1", alias=2),
        ),
    ).encode()
    for cut in range(1, len(birth)):
        try:
            payload = decode_payload(birth[:cut])
        except PayloadError:
            continue
        # A cut between two fields is a shorter valid message: never more than was sent.
        assert len(payload.metrics) <= 2


def test_a_value_field_that_does_not_fit_the_datatype_is_an_error() -> None:
    pb = PbPayload()
    metric = pb.metrics.add()
    metric.name, metric.datatype, metric.string_value = "Count", DataType.UINT32, "12"
    (read,) = decode_payload(pb.SerializeToString()).metrics
    with pytest.raises(PayloadError, match="metric 'Count': a UInt32 in field 15"):
        read.value()


def test_the_rebirth_request_reads_in_pysparkplug() -> None:
    command = NCmd.decode(encode_rebirth_request(T))
    assert command.timestamp == T
    (metric,) = command.metrics
    assert (metric.name, metric.datatype, metric.value) == (
        "Node Control/Rebirth", DataType.BOOLEAN, True,
    )  # fmt: skip
