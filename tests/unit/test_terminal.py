"""Text from orders and agents is shown to a terminal, never obeyed by it."""

from __future__ import annotations

import pytest

from workorder_operator.terminal import escape


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text, 42 % done: ok", "plain text, 42 % done: ok"),
        ("\x1b[2J", "^[[2J"),  # as kubectl
        ("over\rwrite", "over\\rwrite"),  # as kubectl
        ("title\x1b]0;x\x07", "title^[]0;x\\x07"),
        ("a\x00b\x7fc\x9bd", "a\\x00b\\x7fc\\x9bd"),  # NUL, DEL and the C1 CSI
        ("evil\u202etxt.exe", "evil\\u202etxt.exe"),  # right-to-left override
        ("bu\u200bild", "bu\\u200bild"),  # zero-width space
        ("line\u2028sep", "line\\u2028sep"),
        ("private \U000f0000", "private \\U000f0000"),
        ("grüße, 日本語", "grüße, 日本語"),  # printable text stays as it is
        ("two\nlines\tand a tab", "two\\nlines\\tand a tab"),
    ],
)
def test_every_character_a_terminal_acts_on_is_shown(raw: str, shown: str) -> None:
    assert escape(raw) == shown


def test_a_message_of_several_lines_may_keep_its_lines() -> None:
    assert escape("first\n\tsecond\x1b[A\r", keep_lines=True) == "first\n\tsecond^[[A\\r"


def test_escaped_text_is_printable() -> None:
    everything = "".join(map(chr, range(0x2100)))
    assert escape(everything).isprintable()
