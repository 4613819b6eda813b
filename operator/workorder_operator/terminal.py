"""Text from orders and agents made safe to print on a terminal.

An order's status (``lastError``, ``result``, ``history``), an agent's presence lease and an API
server's message quoting either are written by other tenants. Printed raw, their bytes are
instructions to the terminal: ESC starts a control sequence (move the cursor, clear the screen, set
the window title), CR overwrites a line, BEL rings, bidirectional overrides and zero-width
characters make one text look like another. Every such character is shown, never interpreted.

kubectl escapes ESC as ``^[`` and CR as ``\\r`` (``printers.EscapeTerminal``); we do the same for
those two and show every other control, format, separator or unassigned code point as a Python
escape (``\\x07``, ``\\u202e``), so nothing invisible survives. A table cell keeps no newline or
tab either (its columns would shift); a multi-line message may keep them.
"""

from __future__ import annotations

_AS_KUBECTL = {"\x1b": "^[", "\r": "\\r", "\n": "\\n", "\t": "\\t"}


def _shown(char: str) -> str:
    if char in _AS_KUBECTL:
        return _AS_KUBECTL[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape(text: str, *, keep_lines: bool = False) -> str:
    """`text` with every character a terminal would act on made visible. `keep_lines`: newlines
    and tabs stay (a message of several lines); otherwise they are shown too (one table cell)."""
    kept = "\n\t" if keep_lines else ""
    # Python's "printable" leaves out exactly Unicode's Other (controls, format characters such as
    # bidi overrides and zero-width ones, surrogates, private use, unassigned) and Separator
    # categories, the ASCII space excepted.
    return "".join(c if c in kept or c.isprintable() else _shown(c) for c in text)
