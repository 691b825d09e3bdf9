"""A few DER writers, enough to assemble the CSRs and OCSP requests the generators draw,
including ones cryptography's builders refuse to make (repeated extensions, odd serials)."""

from __future__ import annotations

SEQUENCE = 0x30
SET = 0x31
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
NULL = b"\x05\x00"
BOOLEAN_TRUE = b"\x01\x01\xff"


def tlv(tag: int, *content: bytes) -> bytes:
    """Tag, definite length and the concatenated `content`."""
    body = b"".join(content)
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def integer(value: int) -> bytes:
    """An INTEGER, two's complement, minimal length."""
    size = max(1, (value + (value < 0)).bit_length() // 8 + 1)
    return tlv(INTEGER, value.to_bytes(size, "big", signed=True))


def oid(dotted: str) -> bytes:
    """An OBJECT IDENTIFIER (`dotted` has at least two arcs)."""
    arcs = [int(arc) for arc in dotted.split(".")]
    out = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        while arc > 0x7F:
            arc >>= 7
            chunk.append(0x80 | (arc & 0x7F))
        out += bytes(reversed(chunk))
    return tlv(0x06, bytes(out))


def algorithm(dotted: str, *, null_parameters: bool = False) -> bytes:
    """An AlgorithmIdentifier."""
    return tlv(SEQUENCE, oid(dotted), NULL if null_parameters else b"")


def extension(dotted: str, critical: bool, value: bytes) -> bytes:
    """An Extension: its OID, the critical flag (left out when false) and `value` wrapped in
    an OCTET STRING."""
    return tlv(SEQUENCE, oid(dotted), BOOLEAN_TRUE if critical else b"", tlv(OCTET_STRING, value))


def context(number: int, content: bytes) -> bytes:
    """An explicit or constructed [number] tag around `content`."""
    return tlv(0xA0 | number, content)
