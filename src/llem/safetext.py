"""One rule for printing text that came from users: job, window and account names, tags.

Names are chosen by users (``sbatch -J``, ``llem wrap --name``, ``--tag``) and travel through
the spool and the ledger to other people's terminals and to files that programs parse. Before
any of them is printed (``llem-acct``'s table, ``-p``/``-P``, ``llem report`` md and csv,
``llem wrap``'s summary, ``llem doctor``), :func:`safe_text` makes it inert:

* control characters (C0, DEL, C1), lone surrogates, line and paragraph separators and the
  Unicode bidirectional controls (overrides, embeddings, isolates, marks) are shown as visible
  escapes: ``\\n``, ``\\r``, ``\\t``, ``\\x1b``, ``\\x85``, ``\\u202e``, ``\\udc80``;
* a backslash is shown as ``\\\\``, so that the escaped text is unambiguous (a name that
  really contains the two characters ``\\n`` prints as ``\\\\n``);
* every character of ``delimiter`` is escaped the same way (``|`` -> ``\\x7c``), so that a
  value can never add a field to a parsable row. sacct prints such values raw (Slurm's
  ``print_fields_str`` in ``src/common/print_fields.c`` writes the string as is), which lets
  a job name forge fields and rows; this is the one place where llem differs from sacct's
  output on purpose (docs/security.md).

:func:`markdown_cell` adds what a markdown renderer would interpret. ``--json`` output and the
HTML report escape through ``json`` and ``html`` and do not use this module.
"""

from __future__ import annotations

import re

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}

# C0, DEL, C1; Arabic letter mark; LRM/RLM; line and paragraph separators; bidi embeddings
# and overrides (LRE RLE PDF LRO RLO); bidi isolates (LRI RLI FSI PDI); lone surrogates.
_UNSAFE_CLASS = (
    "\\\\\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
)
_UNSAFE = re.compile(f"[{_UNSAFE_CLASS}]")
_delimited: dict[str, re.Pattern[str]] = {}

_MARKDOWN = re.compile(r"[\\`*_\[\]|#~!<>&]")
_MARKDOWN_HTML = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}


def _escape(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _pattern(delimiter: str) -> re.Pattern[str]:
    pattern = _delimited.get(delimiter)
    if pattern is None:
        extra = "".join(re.escape(c) for c in sorted(set(delimiter)))
        pattern = re.compile(f"[{_UNSAFE_CLASS}{extra}]")
        _delimited[delimiter] = pattern
    return pattern


def safe_text(value: object, delimiter: str = "") -> str:
    """``value`` as text that cannot control a terminal or add a field to a parsable row.

    Args:
        value: what to print (anything: ``str(value)`` is escaped; ``None`` gives ``""``).
        delimiter: the field separator of the output, if any; each of its characters is
            escaped inside the value.
    """
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    pattern = _pattern(delimiter) if delimiter else _UNSAFE
    if pattern.search(text) is None:
        return text
    return pattern.sub(lambda m: _escape(m.group()), text)


def safe_texts(texts: list[str], delimiter: str = "") -> list[str]:
    """:func:`safe_text` of many texts: one search over them all (the unsafe characters are
    single characters, so none in the joined text means none in any); the list itself is
    returned when every text is safe already."""
    pattern = _pattern(delimiter) if delimiter else _UNSAFE
    if pattern.search("".join(texts)) is None:
        return texts
    return [safe_text(text, delimiter) for text in texts]


def markdown_cell(value: object) -> str:
    """``value`` safe in a markdown table cell: :func:`safe_text`, then ``|`` and the
    characters a renderer would read as markup (emphasis, code, links, images, headings,
    strike-through) backslash-escaped, and HTML's ``< > &`` as entities."""
    text = safe_text(value)
    return _MARKDOWN.sub(lambda m: _MARKDOWN_HTML.get(m.group(), "\\" + m.group()), text)
