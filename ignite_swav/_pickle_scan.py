"""The callables a pickle refers to, read opcode by opcode without running anything and without holding large
arguments in memory: for the message of a checkpoint file that torch's weights-only reader refused.

``pickletools.genops`` would do the reading, but it loads every argument whole, so a hostile pickle padded with a
1.5 GB bytes object would be read into memory just to be refused.
"""

from __future__ import annotations

import pickletools
import struct
from typing import IO

_OPCODES = {opcode.code: opcode for opcode in pickletools.opcodes}
# Arguments longer than this are skipped, not read: no module or class name is that long.
_LONGEST_KEPT = 1024
_STRING_OPCODES = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING"}
_LENGTH_FORMATS = {
    pickletools.TAKEN_FROM_ARGUMENT1: ("<B", 1),
    pickletools.TAKEN_FROM_ARGUMENT4: ("<i", 4),
    pickletools.TAKEN_FROM_ARGUMENT4U: ("<I", 4),
    pickletools.TAKEN_FROM_ARGUMENT8U: ("<Q", 8),
}


def _skip(stream: IO[bytes], count: int) -> None:
    if stream.seekable():
        stream.seek(count, 1)
        return
    while count > 0:
        chunk = stream.read(min(count, 1 << 20))
        if not chunk:
            raise EOFError
        count -= len(chunk)


def _argument(stream: IO[bytes], descriptor: pickletools.ArgumentDescriptor) -> bytes | None:
    """The argument's bytes when short, ``None`` when skipped (long) or absent."""
    n = descriptor.n
    if n >= 0:
        data = stream.read(n)
        if len(data) != n:
            raise EOFError
        return data
    if n == pickletools.UP_TO_NEWLINE:
        line = stream.readline(_LONGEST_KEPT)
        if not line.endswith(b"\n"):
            raise EOFError  # a very long or unterminated line: not a pickle's name
        if descriptor.name == "stringnl_noescape_pair":  # GLOBAL: module and name on two lines
            second = stream.readline(_LONGEST_KEPT)
            if not second.endswith(b"\n"):
                raise EOFError
            return line + second
        return line
    if n in _LENGTH_FORMATS:
        fmt, size = _LENGTH_FORMATS[n]
        raw = stream.read(size)
        if len(raw) != size:
            raise EOFError
        length = struct.unpack(fmt, raw)[0]
        if length < 0:
            raise EOFError
        if length > _LONGEST_KEPT:
            _skip(stream, length)
            return None
        data = stream.read(length)
        if len(data) != length:
            raise EOFError
        return data
    raise EOFError  # an argument kind this scanner does not know: stop


def referenced_callables(stream: IO[bytes], limit: int = 100_000) -> list[str]:
    """``module.name`` of every GLOBAL / STACK_GLOBAL of the pickles in ``stream`` (several in a row, as the legacy
    torch format writes them), in order; stops at the first byte that is not a pickle opcode, or after ``limit``
    opcodes."""
    names: list[str] = []
    strings: list[str] = []  # the strings pushed, in order: a STACK_GLOBAL takes the last two
    memo: dict[int, str | None] = {}  # memoised strings, for the names a later pickle fetches with BINGET
    last: str | None = None  # the string the previous opcode pushed, if it pushed one
    for _ in range(limit):
        code = stream.read(1)
        if not code:
            break
        opcode = _OPCODES.get(code.decode("latin-1"))
        if opcode is None:
            break  # past the pickles: raw tensor data, or garbage
        try:
            argument = None if opcode.arg is None else _argument(stream, opcode.arg)
        except EOFError:
            break
        pushed: str | None = None
        if opcode.name in _STRING_OPCODES and argument is not None:
            pushed = argument.decode("utf-8", "replace").rstrip("\n")
        elif opcode.name == "MEMOIZE":
            memo[len(memo)] = last
        elif opcode.name in ("BINPUT", "LONG_BINPUT", "PUT") and argument is not None:
            memo[_memo_index(opcode.name, argument)] = last
        elif opcode.name in ("BINGET", "LONG_BINGET", "GET") and argument is not None:
            pushed = memo.get(_memo_index(opcode.name, argument))
        elif opcode.name == "GLOBAL" and argument is not None:
            module, name = argument.decode("utf-8", "replace").split("\n")[:2]
            names.append(f"{module}.{name}")
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(f"{strings[-2]}.{strings[-1]}")
        if pushed is not None:
            strings.append(pushed)
        if opcode.name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):  # these leave the stack as it was
            last = pushed
    return names


def _memo_index(name: str, argument: bytes) -> int:
    if name in ("PUT", "GET"):
        return int(argument.strip() or b"-1")
    return int.from_bytes(argument, "little")
