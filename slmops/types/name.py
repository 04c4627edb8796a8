"""Model names, Ollama style.

Grammar (case-insensitive; stored lower-case)::

    name      = [ host "/" ] [ namespace "/" ] model [ ":" tag ]
    host      = part [ ":" port ]          ; only when three path parts are given
    namespace = part
    model     = part
    part      = alnum { alnum | "_" | "-" | "." }   ; 1..80 chars, never "." or ".."-only
    tag       = alnum-or-"_" { alnum | "_" | "-" | "." } ; 1..80 chars
    port      = nonzero-digit { digit }          ; 1..65535, no leading zero (one spelling per port)

Defaults: host ``registry.ollama.ai``, namespace ``library``, tag ``latest`` — the same as Ollama's, so a store
written by slmops has the paths Ollama users know (``manifests/registry.ollama.ai/library/smollm2/135m``).
Every part maps to one path component; the grammar admits no separator, no ``..`` and no empty part, which is what
keeps a name from escaping the store. What a pull may add around a name (a scheme, a digest) is a
:class:`Reference`, never part of the name: the store is laid out by names only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from slmops.types.digest import Digest
from slmops.types.errors import InvalidDigest, InvalidName

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_PART = re.compile(r"[a-z0-9][a-z0-9_.-]{0,79}")
_TAG = re.compile(r"[a-z0-9_][a-z0-9_.-]{0,79}")
_HOST = re.compile(r"[a-z0-9][a-z0-9_.-]{0,79}(:[0-9]{1,5})?")
MAX_PORT = 65535


def _bad(text: str, why: str) -> InvalidName:
    shown = text if len(text) <= 100 else text[:100] + "..."
    return InvalidName(f'invalid model name "{shown}": {why}; expected [host/][namespace/]model[:tag]')


def _check(pattern: re.Pattern[str], value: str, text: str, what: str) -> str:
    if not pattern.fullmatch(value) or set(value) <= {"."} or ".." in value:
        raise _bad(text, f'bad {what} "{value[:100]}"')
    return value


@dataclass(frozen=True, order=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> "ModelName":
        if not isinstance(text, str) or not text.strip():
            raise _bad(str(text or ""), "empty name")
        raw = text.strip().lower()
        parts = raw.split("/")
        if len(parts) > 3:
            raise _bad(text, "too many '/'")
        last = parts[-1]
        model, sep, tag = last.partition(":")
        if sep and not tag:
            raise _bad(text, "empty tag")
        tag = tag or DEFAULT_TAG
        host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
        if len(parts) == 3:
            host, namespace = parts[0], parts[1]
            _check(_HOST, host, text, "host")
            port = host.partition(":")[2]
            if port and (port.startswith("0") or int(port) > MAX_PORT):
                raise _bad(text, f'bad host port "{port}" (a port is 1 to {MAX_PORT}, without leading zeros)')
        elif len(parts) == 2:
            namespace = parts[0]
        _check(_PART, namespace, text, "namespace")
        _check(_PART, model, text, "model")
        _check(_TAG, tag, text, "tag")
        return cls(host, namespace, model, tag)

    @property
    def path_parts(self) -> tuple[str, str, str, str]:
        """Components of the manifest path; the host's ``:port`` becomes ``%`` as no OS forbids it."""
        return (self.host.replace(":", "%"), self.namespace, self.model, self.tag)

    @classmethod
    def from_path_parts(cls, host: str, namespace: str, model: str, tag: str) -> "ModelName":
        return cls.parse(f"{host.replace('%', ':')}/{namespace}/{model}:{tag}")

    @property
    def display(self) -> str:
        """Shortest unambiguous form, as ``ollama list`` prints it."""
        if self.host != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    def __str__(self) -> str:
        return self.display


SCHEMES = ("http", "https")


@dataclass(frozen=True)
class Reference:
    """What a pull names: a model name, and optionally how to reach its registry and which manifest to take.

    Grammar (case-insensitive, as :class:`ModelName`)::

        reference = [ scheme "://" ] name [ "@" digest ]
        scheme    = "http" | "https"            ; only with a host in the name; http needs --insecure
        name      = ModelName's grammar          ; the tag, given or "latest", is where the model is stored
        digest    = "sha256:" 64 hex             ; pins the registry's manifest, whatever the tag now points at

    ``host_given`` remembers whether the text named a host: ``smollm2`` and ``registry.ollama.ai/library/smollm2``
    are one :class:`ModelName`, but only the second asks for a registry (the first is a catalog name).
    """

    name: ModelName
    digest: Digest | None = None
    scheme: str | None = None
    host_given: bool = False

    @classmethod
    def parse(cls, text: str) -> "Reference":
        if not isinstance(text, str) or not text.strip():
            raise _bad(str(text or ""), "empty name")
        raw = text.strip().lower()
        scheme = None
        if "://" in raw:
            scheme, _, raw = raw.partition("://")
            if scheme not in SCHEMES:
                raise _bad(text, f'bad scheme "{scheme[:20]}" (http:// or https://)')
        raw, at, pinned = raw.partition("@")
        digest = None
        if at:
            try:
                digest = Digest.parse(pinned)
            except InvalidDigest:
                raise _bad(text, "bad digest after '@' (sha256:<64 hex digits>)") from None
        name = ModelName.parse(raw)
        host_given = raw.count("/") == 2
        if scheme and not host_given:
            raise _bad(text, f"{scheme}:// needs a registry host in the name (host[:port]/namespace/model)")
        return cls(name, digest, scheme, host_given)

    @classmethod
    def of(cls, name: ModelName) -> "Reference":
        """A plain name as a reference; a host other than the default one can only have been written out."""
        return cls(name, host_given=name.host != DEFAULT_HOST)

    @property
    def remote(self) -> bool:
        """Whether this names a registry (a host, a scheme or a manifest digest) rather than a catalog model."""
        return self.host_given or self.scheme is not None or self.digest is not None

    @property
    def repository(self) -> str:
        """The registry's repository name (``namespace/model``)."""
        return f"{self.name.namespace}/{self.name.model}"

    @property
    def manifest_ref(self) -> str:
        """What the registry's manifest URL ends with: the digest when pinned, else the tag."""
        return str(self.digest) if self.digest else self.name.tag

    @property
    def display(self) -> str:
        scheme = f"{self.scheme}://" if self.scheme else ""
        name = f"{self.name.host}/{self.name.namespace}/{self.name.model}:{self.name.tag}" if self.host_given \
            else self.name.display
        return f"{scheme}{name}{'@' + str(self.digest) if self.digest else ''}"

    def __str__(self) -> str:
        return self.display
