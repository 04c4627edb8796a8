import pytest

from slmops.modelfile.template import ChatTemplate, go_to_jinja
from slmops.types.errors import TemplateError

SMOL = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_gguf_jinja_template_renders_known_good(shared_store):
    from conftest import DEFAULT
    from slmops.store import manifests as mt
    source = shared_store.read_text(shared_store.manifest(DEFAULT), mt.TEMPLATE)
    assert source == SMOL
    out = ChatTemplate.compile(source).render([{"role": "user", "content": "Hi"}])
    assert out == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                   "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    out = ChatTemplate.compile(source).render([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}])
    assert out == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"


LEGACY = """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}<|im_end|>
"""

MESSAGES = """{{- if .System }}SYS:{{ .System }}
{{ end }}{{- range .Messages }}{{ if eq .Role "user" }}U:{{ .Content }}{{ else if eq .Role "assistant" }}A:{{ .Content }}{{ end }}
{{ end }}A:"""


def test_go_legacy_template_renders_per_turn_and_cuts_at_response():
    t = ChatTemplate.compile(LEGACY)
    out = t.render([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"}, {"role": "user", "content": "q2"}])
    assert out == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo"
                   "<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n")


def test_go_messages_template_translates():
    t = ChatTemplate.compile(MESSAGES)
    out = t.render([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"}, {"role": "user", "content": "q"}])
    assert out == "SYS:S\n\nU:hi\nA:yo\nU:q\nA:"  # .Messages holds the system message too, as in Ollama


@pytest.mark.parametrize("bad,msg", [
    ("{{ range $i, $m := .Messages }}{{ $last := 1 }}{{ end }}", "unsupported"),
    ("{{ if .System }}never closed", "unclosed if"),
    ("{{ .System | upper }}", "unsupported"),
    ("{{ slice .Messages 1 }}", "unsupported Go template function"),
    ("{% for m in messages %}", "does not parse"),
])
def test_unsupported_templates_are_rejected_clearly(bad, msg):
    with pytest.raises(TemplateError, match=msg):
        ChatTemplate.compile(bad).render([{"role": "user", "content": "x"}])


def test_sandbox_blocks_python_internals():
    t = ChatTemplate.compile("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TemplateError):
        t.render([{"role": "user", "content": "x"}])


def test_raise_exception_becomes_template_error():
    t = ChatTemplate.compile("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="roles must alternate"):
        t.render([{"role": "user", "content": "x"}])


def test_literal_braces_in_go_text_survive():
    assert go_to_jinja("{% raw %} {{ .Prompt }}") == "{% raw %}{% raw %} {% endraw %}{{ prompt }}"


def test_a_template_is_compiled_once_however_often_it_renders(monkeypatch):
    """Every chat request renders the model's template: Jinja's parse and code generation happen once for it."""
    from slmops.modelfile import template as tpl
    calls = []
    real = tpl._JINJA_ENV.from_string
    monkeypatch.setattr(tpl._JINJA_ENV, "from_string", lambda src: calls.append(src) or real(src))
    chat = tpl.ChatTemplate.compile("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}#once")
    texts = {chat.render([{"role": "user", "content": f"question {i}"}]) for i in range(3)}
    assert texts == {f"[user] question {i}\n#once" for i in range(3)}
    assert len(calls) == 1
