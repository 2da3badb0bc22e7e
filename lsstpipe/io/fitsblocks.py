"""FITS at the level of blocks and cards: what a writer of many small HDUs of a fixed layout needs without
astropy's per-card machinery (which costs milliseconds per HDU), and a scanner that finds each HDU's
header cards and data in a file's bytes and verifies CHECKSUM/DATASUM.

Cards are formatted as astropy formats them (``tests/test_fitsblocks.py`` compares); anything beyond
integers, booleans and strings is left to astropy (:func:`card_images`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from astropy.io import fits

from kernels.checksum import ones_complement_sum32

__all__ = ["BLOCK", "FitsLayoutError", "Hdu", "card", "card_images", "checksum_cards", "encode_checksum",
           "header_block", "padding", "scan"]  # fmt: skip

BLOCK = 2880
_EXCLUDE = frozenset(range(0x3A, 0x41)) | frozenset(range(0x5B, 0x61))


class FitsLayoutError(ValueError):
    """The bytes are not FITS as the scanner reads it (truncated, a header without END, a bad card)."""


def card(keyword: str, value, comment: str = "") -> str:
    """The 80-character card ``keyword = value / comment`` for an int, bool or str value."""
    if isinstance(value, bool):
        text = f"{'T' if value else 'F':>20}"
    elif isinstance(value, int):
        text = f"{value:>20}"
    elif value == "":
        text = "''"  # astropy writes the empty string unpadded
    elif isinstance(value, str):
        quoted = "'" + value.replace("'", "''").ljust(8) + "'"
        text = f"{quoted:<20}"
    else:
        raise TypeError(f"card() formats int, bool and str values, not {type(value).__name__}")
    image = f"{keyword:<8}= {text}"
    if comment:
        image += f" / {comment}"
    if len(image) > 80:
        raise ValueError(f"card {keyword} does not fit in 80 characters: {image!r}")
    return image.ljust(80)


def card_images(header: fits.Header) -> list[str]:
    """The 80-character cards of an astropy header, as astropy writes them."""
    return [str(c) for c in header.cards]


def header_block(cards: list[str]) -> bytes:
    """The header's bytes: the cards, END, and blanks to a whole number of blocks."""
    text = "".join(cards) + "END".ljust(80)
    return (text + " " * (-len(text) % BLOCK)).encode("ascii")


def padding(nbytes: int) -> bytes:
    """The zero bytes that complete ``nbytes`` of data to whole blocks."""
    return b"\0" * (-nbytes % BLOCK)


def encode_checksum(value: int) -> str:
    """The 16-character ASCII form of a 32-bit checksum (the FITS checksum paper's algorithm)."""
    asc = [0] * 16
    for i in range(4):
        byte = (value >> (8 * (3 - i))) & 0xFF
        q, r = byte // 4 + ord("0"), byte % 4
        ch = [q + r, q, q, q]
        again = True
        while again:
            again = False
            for j in (0, 2):
                while ch[j] in _EXCLUDE or ch[j + 1] in _EXCLUDE:
                    ch[j] += 1
                    ch[j + 1] -= 1
                    again = True
        for j in range(4):
            asc[4 * j + i] = ch[j]
    return bytes(asc[(i + 15) % 16] for i in range(16)).decode("ascii")


def checksum_cards(cards: list[str], data_sums: int, comment: str) -> list[str]:
    """``cards`` with CHECKSUM and DATASUM appended for an HDU whose data (padding included) sums to
    ``data_sums`` (:func:`~kernels.checksum.ones_complement_sum32`)."""
    datasum = card("DATASUM", str(data_sums), comment)
    zero = cards + [card("CHECKSUM", "0" * 16, comment), datasum]
    total = ones_complement_sum32(header_block(zero), data_sums)
    return cards + [card("CHECKSUM", encode_checksum(~total & 0xFFFFFFFF), comment), datasum]


@dataclass(frozen=True)
class Hdu:
    """One HDU found by :func:`scan`: its cards, the value text of each keyword, and where its data lies."""

    cards: tuple[str, ...]
    values: dict
    header_offset: int
    data_offset: int

    def get(self, key: str, default=None):
        """A keyword's value: int, float, bool or str (quotes removed), or ``default``."""
        text = self.values.get(key)
        if text is None:
            return default
        if text.startswith("'"):
            return text[1:].rsplit("'", 1)[0].replace("''", "'").rstrip()
        if text in ("T", "F"):
            return text == "T"
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text.replace("D", "E"))
        except ValueError:
            raise FitsLayoutError(f"keyword {key} has a value that is not a FITS number: {text!r}") from None

    @property
    def data_size(self) -> int:
        """Bytes of data (padding excluded) that the structural keywords describe."""
        naxis = self.get("NAXIS", 0)
        count = math.prod(self.get(f"NAXIS{i}", 0) for i in range(1, naxis + 1)) if naxis else 0
        return abs(self.get("BITPIX", 8)) // 8 * self.get("GCOUNT", 1) * (self.get("PCOUNT", 0) + count)

    @property
    def name(self) -> str:
        return str(self.get("EXTNAME", "PRIMARY" if self.header_offset == 0 else "")).strip()


def _value_text(image: str) -> str:
    """The value part of a ``KEY = value / comment`` card (quotes kept for strings)."""
    rest = image[10:].strip()
    if rest.startswith("'"):
        i = 1
        while True:
            j = rest.find("'", i)
            if j < 0:
                raise FitsLayoutError(f"unterminated string in card {image.rstrip()!r}")
            if rest[j + 1 : j + 2] == "'":
                i = j + 2
                continue
            return rest[: j + 1]
    return rest.split("/", 1)[0].strip()


def scan(buf: bytes) -> list[Hdu]:
    """Every HDU of a FITS file's bytes, in order. Raises :class:`FitsLayoutError` if a header has no END
    or a data part reaches past the end (the message says which)."""
    hdus: list[Hdu] = []
    pos, size = 0, len(buf)
    while pos < size:
        if hdus and not buf.startswith(b"XTENSION=", pos):
            if not bytes(buf[pos:]).strip(b"\0 "):
                break  # blank or zero blocks after the last HDU: padding some writers leave
            raise FitsLayoutError(f"not a readable FITS file: what follows HDU {len(hdus) - 1} at byte {pos} is not "
                                  "an extension header (no XTENSION card)")  # fmt: skip
        start, cards, values = pos, [], {}
        while True:
            if pos + BLOCK > size:
                raise FitsLayoutError(f"not a readable FITS file: header {len(hdus)} has no END card before the end "
                                      "of the file (truncated, or not FITS)")  # fmt: skip
            block = buf[pos : pos + BLOCK].decode("ascii", errors="replace")
            pos += BLOCK
            ended = False
            for k in range(0, BLOCK, 80):
                image = block[k : k + 80]
                key = image[:8].rstrip()
                if key == "END":
                    ended = True
                    break
                cards.append(image)
                if image[8:10] == "= " and key not in values:
                    values[key] = _value_text(image)
            if ended:
                break
        hdu = Hdu(tuple(cards), values, start, pos)
        nbytes = hdu.data_size
        end = pos + nbytes + (-nbytes % BLOCK)
        if pos + nbytes > size:
            raise FitsLayoutError(f"file is truncated: its headers describe {pos + nbytes} bytes but it has {size}")
        hdus.append(hdu)
        pos = end
    return hdus


def verify(buf: bytes, hdu: Hdu) -> bool:
    """Whether the HDU's CHECKSUM and DATASUM, where present, hold."""
    size = hdu.data_size
    end = hdu.data_offset + size + (-size % BLOCK)
    data = memoryview(buf)[hdu.data_offset : min(end, len(buf))]
    data_sum = ones_complement_sum32(data)
    if "DATASUM" in hdu.values and str(hdu.get("DATASUM")).strip() != str(data_sum):
        return False
    if "CHECKSUM" in hdu.values:
        header = memoryview(buf)[hdu.header_offset : hdu.data_offset]
        return ones_complement_sum32(header, data_sum) == 0xFFFFFFFF
    return True
