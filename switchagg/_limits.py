"""Limits on what a peer may send, checked before anything else touches its bytes.

What it owns: the named bounds of a control frame (size, nesting depth, integer digits, string
length and characters) and the checks that enforce them; the check of a ZeroMQ endpoint string,
shared by the switch's config and the worker's client. What it must never do: I/O, or decide what
a valid message means (protocol.py does that on what passes here).

How it works: `load_json` is `json.loads` with three guards a hostile peer would otherwise reach:
  1. size: the frame is refused before it is parsed when it exceeds the caller's limit;
  2. depth: string contents are blanked with one regular expression (linear, C speed), then the
     nesting of [ and { is one cumulative sum over the remaining bytes; deeper than MAX_DEPTH is
     refused before json recurses (Python's parser raises RecursionError a few thousand deep);
  3. numbers: integers with more than MAX_INT_DIGITS digits are refused by the parser's own
     `parse_int` hook (int() of 5,000 digits raises ValueError past Python's int-string limit, and
     of 4,000 it costs milliseconds). NaN and Infinity parse, and every numeric field refuses them.
Every refusal is a `ProtocolError` naming the field ("length", "depth", "integer", "body").
Strings are checked by the messages that hold them (`check_name`, `check_text`): an identifier
(job name, token) is printable ASCII, so comparing tokens never meets a non-ASCII character.
"""

from __future__ import annotations

import json
import re

import numpy as np

from switchagg.errors import ProtocolError

__all__ = ["MAX_DEPTH", "MAX_INT_DIGITS", "MAX_NAME_LEN", "MAX_TEXT_LEN", "NAME_CHARS",
           "load_json", "json_depth", "check_name", "check_text", "check_endpoint",
           "ENDPOINT_SCHEMES"]

#: Deepest nesting of arrays and objects a control frame may have. The deepest message, STATS_REPLY,
#: is 5 deep (body, stats, jobs, one job, its malformed counts); h11 and msgpack bound theirs too.
MAX_DEPTH = 8
#: Digits of the longest integer (a sign aside). Every integer field fits in 64 bits (20 digits);
#: Python refuses to parse more than 4300 and a peer should not make us try.
MAX_INT_DIGITS = 20
#: Job names and tokens are identifiers, not documents.
MAX_NAME_LEN = 128
#: Free text (ERROR.message, ABORT.reason, LEAVE.reason): long enough for a sentence with context.
MAX_TEXT_LEN = 1024
#: Characters of an identifier: printable ASCII, space excluded (0x21..0x7e).
NAME_CHARS = "printable ASCII without space (0x21-0x7e)"
_NAME_RE = re.compile(r"[\x21-\x7e]*")
#: A JSON string: a quote, then non-quote-non-backslash characters or escapes, then a quote.
_STRING_RE = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1
#: Endpoint schemes a worker or the switch may use.
ENDPOINT_SCHEMES = ("tcp://", "ipc://", "inproc://")
_TCP_RE = re.compile(r"tcp://(\*|\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(\*|[0-9]{1,5})")


def json_depth(raw: bytes) -> int:
    """Deepest nesting of arrays and objects in `raw`, strings ignored (never recurses)."""
    blanked = _STRING_RE.sub(b'""', raw)
    if not blanked:
        return 0
    steps = _OPEN[np.frombuffer(blanked, np.uint8)]
    if not steps.any():
        return 0
    return int(np.cumsum(steps, dtype=np.int64).max())


def _parse_int(text: str) -> int:
    digits = len(text) - (text[0] == "-")
    if digits > MAX_INT_DIGITS:
        raise ProtocolError(f"control message holds an integer of {digits} digits; at most "
                            f"{MAX_INT_DIGITS} allowed", field="integer", value=text[:24] + "...")
    return int(text)


def load_json(frame: bytes | memoryview, max_bytes: int) -> object:
    """Parse a peer's JSON frame within the limits above.

    Raises:
        ProtocolError: too large ("length"), too deep ("depth"), an over-long integer ("integer"),
            not UTF-8 JSON ("body").
    """
    if len(frame) > max_bytes:
        raise ProtocolError(f"control message of {len(frame)} bytes exceeds {max_bytes}",
                            field="length", value=len(frame))
    raw = bytes(frame)
    depth = json_depth(raw)
    if depth > MAX_DEPTH:
        raise ProtocolError(f"control message nests {depth} deep; at most {MAX_DEPTH} allowed",
                            field="depth", value=depth)
    try:
        return json.loads(raw, parse_int=_parse_int)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"control message is not JSON: {exc}", field="body") from None
    except RecursionError:  # unreachable after the depth check; kept so no input can crash us
        raise ProtocolError("control message nests too deep", field="depth") from None


def check_name(owner: str, name: str, value: object, allow_empty: bool = True) -> None:
    """An identifier: a str of at most MAX_NAME_LEN characters from NAME_CHARS.

    Raises:
        ProtocolError: naming `name`.
    """
    if not isinstance(value, str):
        raise ProtocolError(f"{owner}.{name}={value!r:.40}: expected a string", field=name)
    if len(value) > MAX_NAME_LEN:
        raise ProtocolError(f"{owner}.{name} is {len(value)} characters; at most {MAX_NAME_LEN} "
                            "allowed", field=name, value=value[:32])
    if not _NAME_RE.fullmatch(value):
        raise ProtocolError(f"{owner}.{name} holds characters outside {NAME_CHARS}", field=name,
                            value=value.encode("ascii", "backslashreplace")[:32].decode())
    if not value and not allow_empty:
        raise ProtocolError(f"{owner}.{name} is empty; name it", field=name, value=value)


def check_text(owner: str, name: str, value: object) -> None:
    """Free text: a str of at most MAX_TEXT_LEN characters.

    Raises:
        ProtocolError: naming `name`.
    """
    if not isinstance(value, str):
        raise ProtocolError(f"{owner}.{name} must be a string", field=name)
    if len(value) > MAX_TEXT_LEN:
        raise ProtocolError(f"{owner}.{name} is {len(value)} characters; at most {MAX_TEXT_LEN} "
                            "allowed", field=name, value=value[:32])


def check_endpoint(endpoint: object) -> str:
    """A ZeroMQ endpoint the client can connect to or the switch bind: returns it.

    tcp://HOST:PORT (HOST a name, an address, [IPv6] or *; PORT 0-65535 or *), ipc://PATH or
    inproc://NAME. Checked before any socket or thread exists, so a typo fails at once with the
    reason instead of inside an engine thread.

    Raises:
        ValueError: naming the endpoint and what is wrong with it.
    """
    if not isinstance(endpoint, str) or not endpoint.startswith(ENDPOINT_SCHEMES):
        raise ValueError(f"endpoint {endpoint!r}: expected tcp://HOST:PORT, ipc://PATH or "
                         f"inproc://NAME")
    if endpoint.startswith("tcp://"):
        match = _TCP_RE.fullmatch(endpoint)
        if match is None:
            raise ValueError(f"endpoint {endpoint!r}: expected tcp://HOST:PORT with a port, e.g. "
                             "tcp://127.0.0.1:5555")
        port = match.group(2)
        if port != "*" and not 0 <= int(port) <= 65535:
            raise ValueError(f"endpoint {endpoint!r}: port {port} is outside 0-65535")
    elif len(endpoint) <= len("ipc://"):
        raise ValueError(f"endpoint {endpoint!r}: name the path or inproc name")
    return endpoint
