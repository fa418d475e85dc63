"""A structural check of an encoded data set: does every element fit?

pydicom reads leniently: a data set cut off in the middle of its pixel data,
or one with a garbage length field, still "reads". For an archive that
promises to keep what it acknowledged, a truncated instance must be refused
when it arrives (0xC210, "undecodable"), not discovered by a worker later.
This walks the element headers of PS3.5 Section 7.1 (explicit and implicit
VR, little and big endian), into sequences and items of undefined length
(7.5) and encapsulated pixel data (A.4), seeking over values, so it costs a
few microseconds per element whatever the size of the pixel data.
"""

from __future__ import annotations

import struct
import zlib
from io import BytesIO
from typing import BinaryIO

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
#: VRs with a 2-byte reserved field and a 4-byte length (PS3.5 Table 7.1-1).
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
MAX_DEPTH = 32


class Undecodable(ValueError):
    """The data set is not a well-formed sequence of elements."""


class _Walker:
    def __init__(self, fp: BinaryIO, end: int, implicit: bool, little: bool) -> None:
        self.fp = fp
        self.end = end
        self.implicit = implicit
        self.e = "<" if little else ">"

    def _read(self, n: int, what: str) -> bytes:
        data = self.fp.read(n)
        if len(data) != n:
            raise Undecodable(f"data set ends inside {what} (truncated)")
        return data

    def _tag(self) -> int:
        group, elem = struct.unpack(self.e + "HH", self._read(4, "an element tag"))
        return (group << 16) | elem

    def _header(self, tag: int) -> tuple[bytes | None, int]:
        # Item and delimiter tags are always "implicit": tag + 4-byte length.
        if self.implicit or (tag >> 16) == 0xFFFE:
            (length,) = struct.unpack(self.e + "L", self._read(4, "an element length"))
            return None, length
        vr = self._read(2, "a VR")
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise Undecodable(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has no valid VR")
        if vr in LONG_VRS:
            self._read(2, "a reserved field")
            (length,) = struct.unpack(self.e + "L", self._read(4, "an element length"))
        else:
            (length,) = struct.unpack(self.e + "H", self._read(2, "an element length"))
        return vr, length

    def _skip(self, tag: int, length: int) -> None:
        pos = self.fp.tell()
        if pos + length > self.end:
            raise Undecodable(
                f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the end of the data set (truncated)"
            )
        self.fp.seek(pos + length)

    def dataset(self, depth: int = 0, until_item_delimiter: bool = False, limit: int | None = None) -> None:
        """Walk elements until the end (or the item's end/delimiter)."""
        stop = self.end if limit is None else limit
        if depth > MAX_DEPTH:
            raise Undecodable("sequences nested too deep")
        while self.fp.tell() < stop:
            tag = self._tag()
            if tag == ITEM_DELIMITER:
                if not until_item_delimiter:
                    raise Undecodable("item delimiter outside an item")
                self._read(4, "a delimiter length")
                return
            vr, length = self._header(tag)
            if length == UNDEFINED:
                if tag == 0x7FE00010 and vr in (None, b"OB", b"OW"):
                    self.fragments(tag)
                elif vr == b"UN":
                    # PS3.5 6.2.2: an UN of undefined length holds a
                    # sequence encoded in Implicit VR Little Endian.
                    implicit, e = self.implicit, self.e
                    self.implicit, self.e = True, "<"
                    try:
                        self.sequence(depth + 1)
                    finally:
                        self.implicit, self.e = implicit, e
                elif vr in (None, b"SQ"):
                    self.sequence(depth + 1)
                elif vr in (b"OB", b"OW"):
                    self.fragments(tag)
                else:
                    raise Undecodable(
                        f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has an undefined length its VR does not allow"
                    )
            elif vr == b"SQ" and length:
                start = self.fp.tell()
                self._skip(tag, length)
                self.fp.seek(start)
                self.sequence(depth + 1, limit=start + length)
            else:
                self._skip(tag, length)
        if self.fp.tell() > stop:
            raise Undecodable("an element runs past the end of its item")
        if until_item_delimiter:
            raise Undecodable("item of undefined length without a delimiter (truncated)")

    def sequence(self, depth: int, limit: int | None = None) -> None:
        stop = limit
        while stop is None or self.fp.tell() < stop:
            tag = self._tag()
            (length,) = struct.unpack(self.e + "L", self._read(4, "an item length"))
            if tag == SEQUENCE_DELIMITER:
                if stop is not None:
                    raise Undecodable("sequence delimiter in a sequence of defined length")
                return
            if tag != ITEM:
                raise Undecodable(f"expected an item in a sequence, found ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            if length == UNDEFINED:
                self.dataset(depth, until_item_delimiter=True)
            else:
                start = self.fp.tell()
                self._skip(tag, length)
                self.fp.seek(start)
                self.dataset(depth, limit=start + length)
                self.fp.seek(start + length)

    def fragments(self, tag: int) -> None:
        """Encapsulated pixel data (PS3.5 A.4): items, then a sequence delimiter."""
        while True:
            item = self._tag()
            (length,) = struct.unpack(self.e + "L", self._read(4, "a fragment length"))
            if item == SEQUENCE_DELIMITER:
                return
            if item != ITEM or length == UNDEFINED:
                raise Undecodable("encapsulated pixel data has a malformed fragment")
            self._skip(tag, length)


def check_structure(fp: BinaryIO, start: int, transfer_syntax: str) -> None:
    """Raise :class:`Undecodable` unless the data set from ``start`` to the
    end of ``fp`` is a well-formed sequence of elements."""
    fp.seek(0, 2)
    end = fp.tell()
    fp.seek(start)
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        try:
            raw = zlib.decompressobj(-zlib.MAX_WBITS).decompress(fp.read())
        except zlib.error as exc:
            raise Undecodable("deflated data set does not inflate") from exc
        fp, end = BytesIO(raw), len(raw)
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little = transfer_syntax != ExplicitVRBigEndian
    begin = fp.tell()
    if begin >= end:
        raise Undecodable("the data set is empty")
    try:
        _Walker(fp, end, implicit, little).dataset()
    except Undecodable:
        if implicit or not little:
            raise
        # Like pydicom, accept an Implicit VR data set sent under an
        # Explicit VR Little Endian context (a common sender bug): readers
        # detect it the same way.
        fp.seek(begin)
        try:
            _Walker(fp, end, True, True).dataset()
        except Undecodable:
            pass
        else:
            return
        raise


def dataset_offset(fp: BinaryIO) -> int:
    """Where the data set starts in a Part 10 file written by pynetdicom:
    after the preamble, "DICM" and the File Meta group (PS3.10 7.1)."""
    fp.seek(128)
    head = fp.read(16)
    if len(head) < 16 or head[:4] != b"DICM" or head[4:8] != b"\x02\x00\x00\x00":
        raise Undecodable("no File Meta Information")
    (group_length,) = struct.unpack("<L", head[12:16])
    return 144 + group_length
