"""Safe quoting of user-supplied text in messages: control characters escaped, long text truncated."""

from __future__ import annotations

import reprlib
import unicodedata

#: Characters kept as they are besides printable text (none: tabs and newlines are escaped too).
_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape_char(ch: str) -> str:
    """One character as it may appear in a one-line message."""
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    category = unicodedata.category(ch)
    if category in ("Cc", "Cs", "Cf", "Co", "Cn", "Zl", "Zp"):  # controls, surrogates, invisible, unassigned
        code = ord(ch)
        return f"\\x{code:02x}" if code < 0x100 else (f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return ch


def safe(text: object, limit: int = 80) -> str:
    """``text`` quoted for an error message: ``'...'`` with control and invisible characters escaped,
    cut to about ``limit`` characters (``...`` and the full length appended when cut)."""
    s = text if isinstance(text, str) else reprlib.repr(text)  # bounded: never recurses deeply
    escaped = "".join(_escape_char(c) for c in s[: max(limit, 1)])
    cut = len(s) > limit or len(escaped) > limit
    quoted = "'" + escaped[:limit].replace("'", "\\'") + "'"
    return f"{quoted}... ({len(s):,} characters)" if cut else quoted
