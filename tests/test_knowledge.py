"""Knowledge files (FILE in a Modelfile): reading and chunking, the index layer, building, and refusals that leave
the store as it was. Units use a small stand-in embedder on the real ``Embedder`` interface; the real embedding
model, server and clients are in tests/test_knowledge_serve.py."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from slmops.modelfile import build, parse, render
from slmops.modelfile import knowledge as kn
from slmops.store import knowledge as ks
from slmops.store import manifests as mt
from slmops.types.errors import InvalidInput, InvalidModelFile, ModelfileError
from slmops.types.name import ModelName

HANDBOOK = Path(__file__).parents[1] / "bench" / "knowledge" / "vantor-k7-handbook.md"


# -- a PDF made by hand: pypdf reads PDFs, it does not lay out text -----------------------------------------------
def pdf(pages: list[str]) -> bytes:
    """A minimal PDF with one page of Helvetica text per item (lines split on newlines)."""
    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages)))
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode(),
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, text in enumerate(pages):
        body = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({esc(l)}) Tj T*" for l in text.split("\n")) + " ET"
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                    f"/Contents {5 + 2 * i} 0 R >>".encode())
        objs.append(f"<< /Length {len(body)} >>\nstream\n{body}\nendstream".encode())
    out, offsets = b"%PDF-1.4\n", []
    for n, obj in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n".encode() + obj + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    return out + f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()


def encrypted(data: bytes, user_password: str) -> bytes:
    from pypdf import PdfReader, PdfWriter
    w = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    w.encrypt(user_password=user_password, owner_password="owner")
    buf = io.BytesIO()
    w.write(buf)
    return buf.getvalue()


def blank_pdf() -> bytes:
    from pypdf import PdfWriter
    w = PdfWriter()
    w.add_blank_page(612, 792)
    buf = io.BytesIO()
    w.write(buf)
    return buf.getvalue()


class WordHashEmbedder:
    """A stand-in on the real interface: a bag of hashed words, 64 dimensions. Records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, model: str, texts: list[str]) -> list[list[float]]:
        self.calls.append((model, texts))
        out = []
        for t in texts:
            v = np.zeros(64)
            for w in re.findall(r"\w+", t.lower()):
                v[int(hashlib.md5(w.encode()).hexdigest(), 16) % 64] += 1
            out.append(list(v))
        return out

    @property
    def embedded(self) -> int:
        return sum(len(t) for _, t in self.calls)


# -- the Modelfile ---------------------------------------------------------------------------------------------
def test_file_and_embedding_parse_and_render_back():
    mf = parse('FROM smollm2:135m\nEMBEDDING all-minilm:l6-v2\nFILE ./docs/guide.md\nfile "my notes.txt"\n')
    assert mf.files == ["./docs/guide.md", "my notes.txt"] and mf.embedding == "all-minilm:l6-v2"
    again = parse(render(mf))
    assert again.files == mf.files and again.embedding == mf.embedding
    with pytest.raises(ModelfileError, match="line 3: more than one EMBEDDING"):
        parse("FROM x\nEMBEDDING a\nEMBEDDING b\n")
    with pytest.raises(ModelfileError, match="line 2: FILE needs a value"):
        parse("FROM x\nFILE\n")


# -- reading -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,data,message", [
    ("notes.docx", b"PK\x03\x04", "FILE notes.docx: unknown file type; knowledge files are text (.txt), Markdown"),
    ("empty.md", b"  \n\n ", "FILE empty.md is empty"),
    ("latin.txt", "caf\u00e9".encode("latin-1"), "FILE latin.txt is not UTF-8 text (byte 3)"),
    ("bin.txt", b"abc\x00def", "FILE bin.txt is not text (it holds NUL bytes)"),
    ("fake.pdf", b"%PDF-1.4 this is not a pdf", "FILE fake.pdf is not a readable PDF"),
])
def test_unusable_files_are_one_line_errors(name, data, message):
    with pytest.raises(InvalidInput) as err:
        kn.prepare(name, data)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_pdf_pages_are_read_and_encrypted_or_textless_pdfs_refused():
    doc = pdf(["The Zorblax kettle boils with moonlight.", "Page two: the warranty lasts nine years."])
    chunks = kn.prepare("manual.pdf", doc)
    assert [(c.page, c.text) for c in chunks] == [(1, "The Zorblax kettle boils with moonlight."),
                                                  (2, "Page two: the warranty lasts nine years.")]
    assert chunks[1].label == "manual.pdf p.2"
    assert kn.prepare("open.pdf", encrypted(doc, ""))[0].text.startswith("The Zorblax")  # owner password only
    with pytest.raises(InvalidInput, match="^FILE locked.pdf is an encrypted PDF; save a copy without a password$"):
        kn.prepare("locked.pdf", encrypted(doc, "secret"))
    with pytest.raises(InvalidInput, match=r"^FILE scan.pdf is a PDF without text \(scanned pages\?\)"):
        kn.prepare("scan.pdf", blank_pdf())


# -- chunking ----------------------------------------------------------------------------------------------------
def test_chunks_keep_paragraphs_whole_and_headings_start_sections():
    text = HANDBOOK.read_text()
    chunks = kn.prepare(HANDBOOK.name, HANDBOOK.read_bytes())
    sections = [c.section for c in chunks]
    assert "Warranty" in sections and "Alarms and error codes" in sections
    for c in chunks:
        assert len(c.text) <= kn.CHUNK_CHARS
        assert text[c.offset:c.offset + len(c.text)] == c.text  # the offset points at the chunk in the file
        assert c.page is None
    warranty = next(c for c in chunks if c.section == "Warranty")
    assert warranty.text.startswith("## Warranty") and "serial number" in warranty.text


def test_a_long_paragraph_is_cut_at_sentence_ends_with_overlap():
    sentences = [f"Sentence number {i} says the code is {1000 + i}." for i in range(80)]
    chunks = kn.chunk_pages("long.txt", [kn.Page(None, " ".join(sentences))])
    assert len(chunks) > 3
    for a, b in zip(chunks, chunks[1:]):
        assert a.text.endswith(".") and len(a.text) <= kn.CHUNK_CHARS
        assert b.offset < a.offset + len(a.text)  # overlap: the next one starts inside this one
    for s in sentences:  # every sentence is whole in at least one chunk
        assert any(s in c.text for c in chunks)


# -- the index layer -------------------------------------------------------------------------------------------------
def test_index_round_trips_and_a_damaged_one_is_refused():
    chunks = [ks.Chunk("a.md", None, 0, "", "alpha"), ks.Chunk("b.pdf", 2, 10, "S", "beta")]
    index = ks.KnowledgeIndex.build(ks.EmbeddingModel("m:1", "sha256:" + "0" * 64, 3), chunks,
                                    [[1, 0, 0], [0, 2, 0]])
    back = ks.KnowledgeIndex.from_bytes(index.to_bytes(), "x")
    assert back.chunks == index.chunks and back.embedding == index.embedding
    assert np.allclose(back.vectors, [[1, 0, 0], [0, 1, 0]])  # stored normalised
    assert [i for i, _ in back.search([0.1, 0.9, 0], 2)] == [1, 0]
    body = json.loads(index.to_bytes())
    body["vectors"] = body["vectors"][:-8]
    with pytest.raises(InvalidModelFile, match="knowledge index of x is damaged"):
        ks.KnowledgeIndex.from_bytes(json.dumps(body).encode(), "x")
    with pytest.raises(InvalidModelFile, match="query embedding has 2 dimensions"):
        back.search([1, 0], 1)


# -- building --------------------------------------------------------------------------------------------------
def files_in(store) -> set[str]:
    return {str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file()}


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    (d / "handbook.md").write_bytes(HANDBOOK.read_bytes())
    (d / "extra.txt").write_text("The Vantor K7 ships in a green box.\n\nIts colour is moss.\n")
    return d


def test_create_stores_a_layer_per_file_and_one_index(store, docs):
    store.pull(ModelName.parse("smollm2:135m"))
    embed = WordHashEmbedder()
    mf = parse("FROM smollm2:135m\nEMBEDDING smollm2:135m\nFILE handbook.md\nFILE ./extra.txt\n")
    m = build.create(store, ModelName.parse("kb"), mf, docs, embed=embed)
    files = ks.file_layers(m)
    assert [ks.file_title(l) for l in files] == ["handbook.md", "extra.txt"]
    assert store.blobs.read_bytes(files[0].blob) == HANDBOOK.read_bytes()
    index = ks.read_index(store, m, "kb")
    weights = store.manifest(ModelName.parse("smollm2:135m")).layer(mt.MODEL).digest
    assert index.embedding == ks.EmbeddingModel("smollm2:135m", weights, 64)
    listed = ks.list_files(store, m, "kb")
    assert [(f.name, f.chunks) for f in listed] == [("handbook.md", len(kn.prepare("h.md", HANDBOOK.read_bytes()))),
                                                     ("extra.txt", 1)]
    assert embed.embedded == len(index.chunks)
    warranty = next(c for c in index.chunks if c.section == "Warranty")
    assert ("Warranty\n" + warranty.text) not in [t for _, ts in embed.calls for t in ts]  # heading not doubled
    # a model built FROM it inherits the knowledge without embedding anything again
    child = build.create(store, ModelName.parse("kb-terse"), parse("FROM kb\nSYSTEM Be terse.\n"), docs, embed=None)
    assert ks.index_layer(child) == ks.index_layer(m) and ks.file_layers(child) == files


def test_a_file_of_the_same_name_replaces_the_base_one_and_only_new_chunks_are_embedded(store, docs, tmp_path):
    store.pull(ModelName.parse("smollm2:135m"))
    build.create(store, ModelName.parse("kb"), parse("FROM smollm2:135m\nEMBEDDING smollm2:135m\nFILE handbook.md\n"
                                                     "FILE extra.txt\n"), docs, embed=WordHashEmbedder())
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "extra.txt").write_text("The Vantor K7 now ships in a red box.\n")
    embed = WordHashEmbedder()
    m = build.create(store, ModelName.parse("kb2"), parse("FROM kb\nFILE extra.txt\n"), newer, embed=embed)
    index = ks.read_index(store, m, "kb2")
    assert embed.embedded == 1  # the handbook's vectors were kept
    extra = [c.text for c in index.chunks if c.source == "extra.txt"]
    assert extra == ["The Vantor K7 now ships in a red box."]
    assert [ks.file_title(l) for l in ks.file_layers(m)] == ["handbook.md", "extra.txt"]


def test_a_bad_file_stops_create_before_anything_is_stored(store, docs):
    store.pull(ModelName.parse("smollm2:135m"))
    (docs / "slides.pptx").write_bytes(b"PK")
    (docs / "locked.pdf").write_bytes(encrypted(pdf(["secret"]), "pw"))
    before = files_in(store)
    embed = WordHashEmbedder()
    for line, message in [("FILE slides.pptx", "FILE slides.pptx: unknown file type"),
                          ("FILE locked.pdf", "FILE locked.pdf is an encrypted PDF"),
                          ("FILE missing.md", "FILE missing.md does not exist"),
                          ("FILE handbook.md\nFILE ./handbook.md", "FILE handbook.md is named twice")]:
        mf = parse(f"FROM smollm2:135m\nFILE extra.txt\n{line}\n")
        with pytest.raises(InvalidInput, match=re.escape(message)):
            build.create(store, ModelName.parse("kb"), mf, docs, embed=embed)
    assert files_in(store) == before and embed.calls == []
    with pytest.raises(InvalidInput, match="^FILE reads a file on the machine that builds the model"):
        build.create(store, ModelName.parse("kb"), parse("FROM smollm2:135m\nFILE extra.txt\n"), None, embed=embed)
    with pytest.raises(ModelfileError, match="EMBEDDING names the model that embeds knowledge files; add FILE"):
        build.create(store, ModelName.parse("kb"), parse("FROM smollm2:135m\nEMBEDDING smollm2:135m\n"), docs,
                     embed=embed)
    assert files_in(store) == before


def test_retrieval_puts_chunks_in_the_system_message_the_model_would_have_had():
    from slmops.engine.client import ModelSpec, Request
    from slmops.server import knowledge as sk
    found = sk.Retrieval((sk.Used(ks.Chunk("guide.md", None, 0, "Pricing", "It costs 42 credits."), 4, 0.61),
                          sk.Used(ks.Chunk("man.pdf", 3, 0, "", "Boils with moonlight."), 0, 0.4)), 0)
    spec = ModelSpec(name="kb", model_path=Path("x"), system="You are terse.")
    chat = sk.augment(Request(messages=[{"role": "user", "content": "price?"}]), spec, found)
    assert chat.messages[0]["role"] == "system" and chat.messages[1] == {"role": "user", "content": "price?"}
    text = chat.messages[0]["content"]
    assert text.startswith("You are terse.\n\n") and "[1] guide.md — Pricing\nIt costs 42 credits." in text
    assert "[2] man.pdf p.3\nBoils with moonlight." in text
    own = sk.augment(Request(messages=[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "?"}]),
                     spec, found)
    assert own.messages[0]["content"].startswith("Be kind.\n\n") and len(own.messages) == 2
    gen = sk.augment(Request(prompt="price?"), spec, found)
    assert gen.system.startswith("You are terse.") and "It costs 42 credits." in gen.system
    assert sk.query_of(Request(prompt="x", raw=True)) is None
    assert sk.query_of(Request(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])) == "a"
    assert found.header() == "guide.md#4, man.pdf#0"
    assert [k.model_dump(exclude_none=True) for k in found.metadata()] == [
        {"source": "guide.md", "chunk": 4, "section": "Pricing", "score": 0.61},
        {"source": "man.pdf", "chunk": 0, "page": 3, "score": 0.4}]


def test_retrieval_refuses_an_embedding_model_with_other_weights_or_none(store, docs):
    from slmops.server.knowledge import Knowledge
    from slmops.types.errors import IntegrityError, NotFound
    store.pull(ModelName.parse("smollm2:135m"))
    m = build.create(store, ModelName.parse("kb"), parse("FROM smollm2:135m\nEMBEDDING smollm2:135m\nFILE extra.txt\n"),
                     docs, embed=WordHashEmbedder())
    knowledge = Knowledge(store, inference=None)  # type: ignore[arg-type] - only the store is reached here
    index = knowledge.index(ModelName.parse("kb"))
    assert index.chunks == ks.read_index(store, m, "kb").chunks
    assert knowledge.index(ModelName.parse("kb")) is index  # parsed once per digest
    assert knowledge.index(ModelName.parse("smollm2:135m")) is None
    assert knowledge._embedder(index, "kb").name == "smollm2:135m"
    other = ks.KnowledgeIndex(ks.EmbeddingModel("smollm2:135m", "sha256:" + "1" * 64, 64), index.chunks, index.vectors)
    with pytest.raises(IntegrityError, match="the knowledge of kb was embedded with smollm2:135m sha256:1111"):
        knowledge._embedder(other, "kb")
    gone = ks.KnowledgeIndex(ks.EmbeddingModel("all-minilm:l6-v2", "sha256:" + "1" * 64, 64), index.chunks,
                             index.vectors)
    with pytest.raises(NotFound, match='embedded with "all-minilm:l6-v2", which is not in the store; pull it'):
        knowledge._embedder(gone, "kb")
