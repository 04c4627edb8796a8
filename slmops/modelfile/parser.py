"""Modelfile parsing, Ollama's syntax: one instruction per line, case-insensitive keywords, ``#`` comments,
values in ``\"\"\"`` spanning lines or in double quotes. Every error names its line.

Beyond Ollama's instructions: ``FILE path`` adds a knowledge file (text, Markdown or PDF; a relative path is the
Modelfile's directory's, as for FROM and ADAPTER), and ``EMBEDDING model`` names the model that embeds them
(:mod:`slmops.modelfile.knowledge`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from slmops.types import options as opts
from slmops.types.errors import InvalidOption, ModelfileError

INSTRUCTIONS = ("FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "MESSAGE", "ADAPTER", "LICENSE", "FILE", "EMBEDDING")
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Modelfile:
    from_: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    licenses: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # knowledge files, as written (paths or blob digests)
    embedding: str | None = None  # the model that embeds them; None: the base's, else the default


def _quote(value: str) -> str:
    return f'"""{value}"""' if ("\n" in value or '"' in value or value != value.strip()) else value


def render(mf: Modelfile, header: str = "") -> str:
    """Modelfile text for ``show --modelfile``; parses back to an equal :class:`Modelfile`."""
    lines = [header.rstrip()] if header else []
    lines.append(f"FROM {mf.from_}")
    if mf.template is not None:
        lines.append(f'TEMPLATE """{mf.template}"""')
    if mf.system is not None:
        lines.append(f'SYSTEM """{mf.system}"""')
    for key, value in mf.parameters.items():
        for v in value if isinstance(value, list) else [value]:
            text = json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)
            lines.append(f"PARAMETER {key} {text}")
    for m in mf.messages:
        lines.append(f"MESSAGE {m['role']} {_quote(m['content'])}")
    for a in mf.adapters:
        lines.append(f"ADAPTER {a}")
    for lic in mf.licenses:
        lines.append(f'LICENSE """{lic}"""')
    if mf.embedding is not None:
        lines.append(f"EMBEDDING {mf.embedding}")
    for f in mf.files:
        lines.append(f"FILE {_quote(f)}")
    return "\n".join(lines) + "\n"


def _read_value(text: str, pos: int, lines_before: int) -> tuple[str, int]:
    """Read a value at ``pos``: triple-quoted (may span lines), double-quoted, or the rest of the line."""
    if text.startswith('"""', pos):
        end = text.find('"""', pos + 3)
        if end < 0:
            raise ModelfileError('unterminated """ (a multi-line value needs a closing """)', lines_before)
        return text[pos + 3:end], end + 3
    eol = text.find("\n", pos)
    eol = len(text) if eol < 0 else eol
    raw = text[pos:eol].strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raw = raw[1:-1]
    return raw, eol


MAX_MODELFILE_CHARS = 1 << 20  # licenses and templates run to tens of KB; a megabyte leaves a wide margin


def parse(text: str) -> Modelfile:
    """One pass over ``text``: line numbers are counted as lines are consumed, never recounted from the start,
    so parsing stays linear (a server parses Modelfiles that anyone with the manage right sends)."""
    if len(text) > MAX_MODELFILE_CHARS:
        raise ModelfileError(f"Modelfile is {len(text)} characters, over the limit of {MAX_MODELFILE_CHARS}; "
                             "move long texts out of it or shorten them")
    mf = Modelfile()
    pos, n, line_no = 0, len(text), 0
    while pos < n:
        line_no += 1
        eol = text.find("\n", pos)
        eol = n if eol < 0 else eol
        line = text[pos:eol]
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            pos = eol + 1
            continue
        m = re.match(r"\s*(\S+)\s*", line)
        word = m.group(1)
        keyword = word.upper()
        if keyword not in INSTRUCTIONS:
            raise ModelfileError(f'unknown instruction "{word[:40]}"; expected one of {", ".join(INSTRUCTIONS)}', line_no)
        start = pos + m.end()
        if keyword == "PARAMETER":
            pm = re.match(r"(\S+)[ \t]+", text[start:eol])
            if not pm:
                raise ModelfileError("PARAMETER needs a name and a value, e.g. PARAMETER temperature 0.7", line_no)
            key = pm.group(1).lower()
            value, pos = _read_value(text, start + pm.end(), line_no)
            _add_parameter(mf, key, value, line_no)
        elif keyword == "MESSAGE":
            mm = re.match(r"(\S+)[ \t]+", text[start:eol])
            if not mm or mm.group(1).lower() not in ROLES:
                raise ModelfileError(f"MESSAGE needs a role ({', '.join(ROLES)}) and a text", line_no)
            value, pos = _read_value(text, start + mm.end(), line_no)
            mf.messages.append({"role": mm.group(1).lower(), "content": value})
        else:
            value, pos = _read_value(text, start, line_no)
            if keyword != "LICENSE" and keyword not in ("TEMPLATE", "SYSTEM") and not value.strip():
                raise ModelfileError(f"{keyword} needs a value", line_no)
            if keyword == "FROM":
                if mf.from_:
                    raise ModelfileError("more than one FROM", line_no)
                mf.from_ = value.strip()
            elif keyword == "TEMPLATE":
                mf.template = value
            elif keyword == "SYSTEM":
                mf.system = value
            elif keyword == "ADAPTER":
                mf.adapters.append(value.strip())
            elif keyword == "FILE":
                mf.files.append(value.strip())
            elif keyword == "EMBEDDING":
                if mf.embedding is not None:
                    raise ModelfileError("more than one EMBEDDING", line_no)
                mf.embedding = value.strip()
            else:
                mf.licenses.append(value)
        line_no += text.count("\n", eol, pos) if pos > eol else 0  # lines a multi-line value spanned
        rest_eol = text.find("\n", pos)
        rest = text[pos:n if rest_eol < 0 else rest_eol]
        if rest.strip() and not rest.strip().startswith("#"):
            raise ModelfileError(f'unexpected text after the value: "{rest.strip()[:40]}"', line_no)
        pos = (n if rest_eol < 0 else rest_eol) + 1
    if not mf.from_:
        raise ModelfileError("no FROM line; a Modelfile starts with FROM <model name or path to .gguf>")
    return mf


def _add_parameter(mf: Modelfile, key: str, value: str, line_no: int) -> None:
    try:
        typed, _ = opts.validate({key: value})
    except InvalidOption as err:
        raise ModelfileError(str(err), line_no) from None
    if key == "stop":
        mf.parameters.setdefault("stop", []).extend(typed["stop"])
    else:
        mf.parameters[key] = typed[key]
