"""Strict structure check of a bundle's zip container.

The writer produces exactly one layout: stored members, fixed metadata, no extra fields or comments,
members back to back, the central directory right after them and the end record at the very end.
Checking every header field against that layout (and the local headers against the central
directory) means no byte of the file can change unnoticed: member bytes are covered by CRC and
sha256, header bytes by this check.
"""

from __future__ import annotations

import struct
import zipfile

from ..errors import BundleError
from .format import CREATE_SYSTEM, FILE_MODE, FIXED_ZIP_TIME, ZIP_VERSION

_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_END = struct.Struct("<4sHHHHIIH")
_CENTRAL = struct.Struct("<4sBBBBHHHHIIIHHHHHII")
_CENTRAL_SIZE = _CENTRAL.size
_UTF8_FLAG = 0x800


def _dos_time(date_time) -> tuple[int, int]:
    year, month, day, hour, minute, second = date_time
    return (hour << 11) | (minute << 5) | (second // 2), ((year - 1980) << 9) | (month << 5) | day


def check_container(handle, file_size: int, infos: list[zipfile.ZipInfo]) -> None:
    """Raise BundleError unless the container is laid out exactly as the writer lays it out."""
    fixed_time, fixed_date = _dos_time(FIXED_ZIP_TIME)
    offset = 0
    for info in infos:
        expected = {
            "compress_type": zipfile.ZIP_STORED, "date_time": FIXED_ZIP_TIME, "create_system": CREATE_SYSTEM,
            "create_version": ZIP_VERSION, "extract_version": ZIP_VERSION, "reserved": 0, "volume": 0,
            "internal_attr": 0, "external_attr": FILE_MODE << 16, "extra": b"", "comment": b"",
            "header_offset": offset, "compress_size": info.file_size,
        }
        for field, value in expected.items():
            if getattr(info, field) != value:
                raise BundleError(f"bundle container is malformed ({info.filename!r}: {field}); the file was altered")
        if info.flag_bits & ~_UTF8_FLAG:
            raise BundleError(f"bundle container is malformed ({info.filename!r}: flags); the file was altered")
        handle.seek(offset)
        header = handle.read(_LOCAL.size)
        if len(header) != _LOCAL.size:
            raise BundleError("bundle is truncated")
        sig, version, flags, method, mtime, mdate, crc, csize, usize, name_len, extra_len = _LOCAL.unpack(header)
        name = handle.read(name_len)
        encoded = info.filename.encode("utf-8" if info.flag_bits & _UTF8_FLAG else "cp437")
        if (sig, version, flags, method, mtime, mdate, crc, csize, usize, extra_len, name) != (
            b"PK\x03\x04", ZIP_VERSION, info.flag_bits, zipfile.ZIP_STORED, fixed_time, fixed_date,
            info.CRC, info.compress_size, info.file_size, 0, encoded,
        ):
            raise BundleError(f"bundle member header of {info.filename!r} does not match the directory; the file was altered")
        offset += _LOCAL.size + name_len + info.compress_size
    central_size = sum(_CENTRAL_SIZE + len(info.filename.encode("utf-8" if info.flag_bits & _UTF8_FLAG else "cp437")) for info in infos)
    if offset + central_size + _END.size != file_size:
        raise BundleError("bundle has unexpected bytes (appended, inserted or truncated); the file was altered")
    handle.seek(offset)
    central = handle.read(central_size)
    position = 0
    for info in infos:
        # Parsed here rather than trusted from zipfile, which tolerates some inconsistent lengths.
        encoded = info.filename.encode("utf-8" if info.flag_bits & _UTF8_FLAG else "cp437")
        fields = _CENTRAL.unpack_from(central, position)
        expected = (b"PK\x01\x02", ZIP_VERSION, CREATE_SYSTEM, ZIP_VERSION, 0, info.flag_bits, zipfile.ZIP_STORED,
                    fixed_time, fixed_date, info.CRC, info.file_size, info.file_size, len(encoded), 0, 0, 0, 0,
                    FILE_MODE << 16, info.header_offset)
        name = central[position + _CENTRAL_SIZE : position + _CENTRAL_SIZE + len(encoded)]
        if fields != expected or name != encoded:
            raise BundleError(f"bundle directory entry of {info.filename!r} is malformed; the file was altered")
        position += _CENTRAL_SIZE + len(encoded)
    end = _END.unpack(handle.read(_END.size))
    if end != (b"PK\x05\x06", 0, 0, len(infos), len(infos), central_size, offset, 0):
        raise BundleError("bundle end record is malformed; the file was altered")
