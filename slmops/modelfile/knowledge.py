"""Knowledge files (``FILE`` in a Modelfile): reading text, Markdown and PDF, and cutting them into chunks.

Everything here runs before anything is stored, so a file that cannot be used (an unknown type, empty, not UTF-8,
an encrypted or text-less PDF) stops ``create`` with one line and leaves the store as it was.

Chunking is by characters, on paragraph boundaries: paragraphs (blank-line separated) are gathered into a chunk
of up to :data:`CHUNK_CHARS`; a Markdown heading always starts a new chunk and names the section of the chunks
under it; a paragraph longer than a chunk is cut at sentence or word ends, the next piece repeating the last
:data:`OVERLAP_CHARS` of the one before, so a fact cut in two is whole in one of them. Characters rather than
tokens, because the index must not depend on the tokenizer of the chat model, and ~900 characters (~200 tokens)
stays under the 256 word pieces all-MiniLM-L6-v2 was trained on while holding a paragraph or two.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Callable

from slmops.store.knowledge import Chunk
from slmops.types.errors import InvalidInput

CHUNK_CHARS = 900
OVERLAP_CHARS = 150
MAX_FILE_BYTES = 64 << 20
MAX_CHUNKS = 20_000
KINDS = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown", ".pdf": "pdf"}
DEFAULT_EMBEDDING_MODEL = "all-minilm:l6-v2"

# (model name, texts) -> one vector per text; the caller's engine (the CLI's in-process one) computes them.
Embedder = Callable[[str, list[str]], list[list[float]]]


@dataclass(frozen=True)
class Page:
    number: int | None  # 1-based for a PDF, None for a text file
    text: str


def check_name(name: str) -> str:
    """The kind of file ``name`` is, by suffix; anything else is refused rather than guessed."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
        raise InvalidInput(f"knowledge file name {name!r} must be a plain file name")
    kind = KINDS.get(PurePath(name).suffix.lower())
    if kind is None:
        raise InvalidInput(f"FILE {name}: unknown file type; knowledge files are text (.txt), Markdown (.md) or "
                           "PDF (.pdf)")
    return kind


def read_pages(name: str, data: bytes) -> list[Page]:
    """The text of ``data`` (the file ``name``), page by page for a PDF."""
    kind = check_name(name)
    if not data.strip():
        raise InvalidInput(f"FILE {name} is empty")
    if len(data) > MAX_FILE_BYTES:
        raise InvalidInput(f"FILE {name} is {len(data)} bytes, over the limit of {MAX_FILE_BYTES} for a knowledge "
                           "file; split it")
    if kind == "pdf":
        return _pdf_pages(name, data)
    if b"\x00" in data:
        raise InvalidInput(f"FILE {name} is not text (it holds NUL bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InvalidInput(f"FILE {name} is not UTF-8 text (byte {err.start}); convert it to UTF-8") from None
    return [Page(None, text.replace("\r\n", "\n"))]


def _pdf_pages(name: str, data: bytes) -> list[Page]:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise InvalidInput(f"FILE {name} is an encrypted PDF; save a copy without a password")
        pages = [Page(i + 1, (page.extract_text() or "").replace("\r\n", "\n"))
                 for i, page in enumerate(reader.pages)]
    except InvalidInput:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError,
            NotImplementedError):
        raise InvalidInput(f"FILE {name} is not a readable PDF") from None
    if not any(p.text.strip() for p in pages):
        raise InvalidInput(f"FILE {name} is a PDF without text (scanned pages?); slmops reads text, not images")
    return pages


_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
_PARAGRAPH = re.compile(r"\n[ \t]*\n+")


def chunk_pages(name: str, pages: list[Page], markdown: bool | None = None) -> list[Chunk]:
    """Chunks of ``pages``, in reading order; a chunk never spans two pages (its page is its citation)."""
    if markdown is None:
        markdown = check_name(name) == "markdown"
    chunks: list[Chunk] = []
    section = ""
    for page in pages:
        buf: list[tuple[int, str]] = []  # (offset, paragraph) gathered for the chunk being built

        def flush() -> None:
            if buf:
                chunks.append(Chunk(name, page.number, buf[0][0], section, "\n\n".join(p for _, p in buf)))
                buf.clear()

        for offset, para in _paragraphs(page.text):
            heading = _HEADING.match(para.splitlines()[0]) if markdown else None
            if heading:
                flush()
                section = heading.group(1)
            size = sum(len(p) + 2 for _, p in buf)
            if buf and size + len(para) > CHUNK_CHARS:
                flush()
            if len(para) > CHUNK_CHARS:
                flush()
                chunks.extend(Chunk(name, page.number, offset + o, section, piece) for o, piece in _split(para))
                continue
            buf.append((offset, para))
        flush()
    if not chunks:
        raise InvalidInput(f"FILE {name} holds no text")
    if len(chunks) > MAX_CHUNKS:
        raise InvalidInput(f"FILE {name} makes {len(chunks)} chunks, over the limit of {MAX_CHUNKS}; split it")
    return chunks


def _paragraphs(text: str) -> list[tuple[int, str]]:
    out, start = [], 0
    for m in _PARAGRAPH.finditer(text + "\n\n"):
        para = text[start:m.start()]
        if para.strip():
            lead = len(para) - len(para.lstrip())
            out.append((start + lead, para.strip()))
        start = m.end()
    return out


def _split(para: str) -> list[tuple[int, str]]:
    """A long paragraph in pieces of at most CHUNK_CHARS, ending at a sentence (else a word) end, each after the
    first starting OVERLAP_CHARS before the previous one ended."""
    pieces, start = [], 0
    while start < len(para):
        end = min(start + CHUNK_CHARS, len(para))
        if end < len(para):
            window = para[start:end]
            cut = max(window.rfind(". "), window.rfind("? "), window.rfind("! "), window.rfind("\n"))
            if cut < CHUNK_CHARS // 2:
                cut = window.rfind(" ")
            if cut > OVERLAP_CHARS:
                end = start + cut + 1
        pieces.append((start, para[start:end].strip()))
        if end >= len(para):
            break
        nxt = end - OVERLAP_CHARS
        space = para.find(" ", nxt, end)
        start = space + 1 if space >= 0 else nxt
    return [(o, p) for o, p in pieces if p]


def embedding_text(chunk: Chunk) -> str:
    """What is embedded for a chunk: its section heading leads, so a question that names the section finds the
    paragraphs under it, not only the heading's own chunk."""
    if chunk.section and not chunk.text.lstrip("# ").startswith(chunk.section):
        return f"{chunk.section}\n{chunk.text}"
    return chunk.text


def prepare(name: str, data: bytes) -> list[Chunk]:
    """Read and chunk one file; every refusal happens here, before anything is stored."""
    return chunk_pages(name, read_pages(name, data))


__all__ = ["CHUNK_CHARS", "DEFAULT_EMBEDDING_MODEL", "Embedder", "OVERLAP_CHARS", "Page", "check_name",
           "chunk_pages", "embedding_text", "prepare", "read_pages"]
