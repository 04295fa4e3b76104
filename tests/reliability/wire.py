"""Hand-made protobuf wire bytes, for requests a protobuf library refuses to build (invalid UTF-8, negative
values in unsigned fields, truncated fields)."""

from __future__ import annotations


def varint(value: int) -> bytes:
    """Base-128 varint of a non-negative integer (a negative int64 is sent as its 64-bit two's complement)."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2: strings, bytes, sub-messages) with any payload."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload
