"""Who a registry client is and how it proves it: logins per host, the TLS trust it uses, and the answer to a
registry's ``401`` (HTTP Basic, or the Bearer token flow of the distribution spec) as an httpx auth flow.

Logins come from ``registries.json`` in ``SLMOPS_HOME`` (``{"host[:port]": {"username": ..., "password": ...}}``,
mode 0600, like ssh keys) or, for the host one CLI command names, from ``SLMOPS_REGISTRY_USERNAME`` and
``SLMOPS_REGISTRY_PASSWORD``. The environment login is never offered by the server: there the host comes from an
API caller, who could name a registry of their own to collect it. A password never appears in a message, a
``repr`` or a log line; errors name the user only.
"""

from __future__ import annotations

import base64
import functools
import json
import ssl
import stat
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generator, Mapping

import httpx

from slmops.config.settings import Settings
from slmops.types.errors import ConfigError, SourceError

CREDENTIALS_FILE = "registries.json"
_FILE_HELP = (f'{CREDENTIALS_FILE} in SLMOPS_HOME ({{"HOST[:PORT]": {{"username": "...", "password": "..."}}}}, '
              "mode 600)")
_MAX_TOKEN_BYTES = 1 << 20


@dataclass(frozen=True)
class Login:
    username: str
    password: str = field(repr=False)

    def header(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


@dataclass(frozen=True)
class RegistryConfig:
    """How to reach registries: logins per host, a login for the one host a command names, extra CAs, and
    whether plain HTTP is allowed (``--insecure``, Ollama's flag)."""

    logins: Mapping[str, Login] = field(default_factory=dict, repr=False)
    command_login: Login | None = field(default=None, repr=False)
    ca_bundle: Path | None = None
    insecure: bool = False

    @classmethod
    def from_settings(cls, settings: Settings, insecure: bool = False, env_login: bool = True) -> "RegistryConfig":
        """``env_login``: offer the ``SLMOPS_REGISTRY_*`` login (the CLI, where the user names the host); the
        server does not."""
        login = None
        if env_login:
            user, password = settings["SLMOPS_REGISTRY_USERNAME"], settings["SLMOPS_REGISTRY_PASSWORD"]
            if bool(user) != bool(password):
                raise ConfigError("set both SLMOPS_REGISTRY_USERNAME and SLMOPS_REGISTRY_PASSWORD, or neither")
            login = Login(user, password) if user else None
        return cls(logins=read_logins(settings.home / CREDENTIALS_FILE), command_login=login,
                   ca_bundle=settings["SLMOPS_CA_BUNDLE"], insecure=insecure)

    def login_for(self, host: str) -> Login | None:
        return self.command_login or self.logins.get(host.lower())

    def ssl_context(self) -> ssl.SSLContext:
        """The system's CA store, plus ``SLMOPS_CA_BUNDLE`` (httpx alone would trust certifi's list instead).
        Built once per bundle file version: loading the system store takes ~20 ms, a fifth of a small pull."""
        if self.ca_bundle is None:
            return _ssl_context(None, 0)
        try:
            stamp = self.ca_bundle.stat().st_mtime_ns
        except OSError:
            stamp = 0  # the load below says what is wrong
        return _ssl_context(str(self.ca_bundle), stamp)


@functools.lru_cache(maxsize=8)
def _ssl_context(ca_bundle: str | None, stamp: int) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if ca_bundle is not None:
        try:
            ctx.load_verify_locations(cafile=ca_bundle)
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"SLMOPS_CA_BUNDLE: cannot load {Path(ca_bundle).name} "
                              f"({getattr(err, 'strerror', None) or err}); it must be a PEM file") from None
    return ctx


def read_logins(path: Path) -> dict[str, Login]:
    """The logins of ``registries.json``; none when it does not exist. A file others can read is refused: it
    holds passwords."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return {}
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{CREDENTIALS_FILE} in SLMOPS_HOME can be read by other users; run "
                          f"`chmod 600` on it")
    try:
        data = json.loads(path.read_text())
        logins = {host.lower(): Login(str(v["username"]), str(v["password"])) for host, v in data.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        raise ConfigError(f"{CREDENTIALS_FILE} in SLMOPS_HOME cannot be read; write it as {_FILE_HELP}") from None
    return logins


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="...",scope="repository:a/b:pull,push"`` -> ("bearer", {...}); commas inside
    quotes stay (the standard library's list parser handles the quoting)."""
    scheme, _, rest = header.strip().partition(" ")
    try:
        params = urllib.request.parse_keqv_list(urllib.request.parse_http_list(rest))
    except ValueError:
        params = {}
    return scheme.lower(), {k.lower(): v for k, v in params.items()}


def _repository(path: str) -> str:
    """``/v2/<ns>/<model>/manifests/<ref>`` -> ``<ns>/<model>`` (the repository a token's scope names)."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if i > 2 and part in ("manifests", "blobs", "tags"):
            return "/".join(parts[2:i])
    return ""


class RegistryAuth(httpx.Auth):
    """Answer a registry's challenge as Docker's client does: Basic with the host's login, or a Bearer token
    fetched from the challenge's realm (with the login, when there is one) for its service and scope, then the
    request again. Tokens are kept per scope for the client's life, so later requests carry them at once;
    a token that expired is fetched again on the next 401.

    Authorization is only ever put on requests to the registry's own host and port: httpx drops it from a
    redirect to another origin, and an upload location elsewhere gets none."""

    def __init__(self, host: str, login: Login | None):
        self.host = host.lower()
        self.login = login
        self._tokens: dict[str, str] = {}  # scope -> token
        self._scopes: dict[str, str] = {}  # repository -> the scope its last challenge asked for
        self._basic = False

    def _own(self, request: httpx.Request) -> bool:
        return request.url.netloc.decode().lower() == self.host

    def _authorize(self, request: httpx.Request) -> None:
        repo = _repository(request.url.path)
        token = self._tokens.get(self._scopes.get(repo, ""))
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        elif self._basic and self.login is not None:
            request.headers["Authorization"] = self.login.header()

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if not self._own(request):
            yield request
            return
        self._authorize(request)
        response = yield request
        if response.status_code != 401:
            return
        scheme, params = parse_challenge(response.headers.get("www-authenticate", ""))
        repo = _repository(request.url.path)
        if scheme == "basic":
            self._need_login(repo)
            self._basic = True
        elif scheme == "bearer" and params.get("realm"):
            actions = "pull" if request.method in ("GET", "HEAD") else "pull,push"
            scope = params.get("scope") or f"repository:{repo}:{actions}"
            token_response = yield self._token_request(params["realm"], params.get("service"), scope)
            self._tokens[scope] = self._token(token_response, repo)
            self._scopes[repo] = scope
        else:
            raise SourceError(f"registry {self.host} asks for authentication slmops does not speak "
                              f"({scheme or 'none given'}); only Basic and Bearer tokens are supported")
        self._authorize(request)
        response = yield request
        if response.status_code == 401:
            raise SourceError(self._refused(repo))

    def _need_login(self, repo: str) -> None:
        if self.login is None:
            raise SourceError(f"registry {self.host} needs a login for {repo}; put it in {_FILE_HELP}, or set "
                              "SLMOPS_REGISTRY_USERNAME and SLMOPS_REGISTRY_PASSWORD")

    def _refused(self, repo: str) -> str:
        if self.login is None:
            return f"registry {self.host} refused access to {repo} without a login; put one in {_FILE_HELP}"
        return (f'registry {self.host} refused the login of user "{self.login.username}" for {repo}; check the '
                "password (registries.json in SLMOPS_HOME, or SLMOPS_REGISTRY_PASSWORD)")

    def _token_request(self, realm: str, service: str | None, scope: str) -> httpx.Request:
        params = {k: v for k, v in (("service", service), ("scope", scope)) if v}
        headers = {"Authorization": self.login.header()} if self.login is not None else {}
        return httpx.Request("GET", httpx.URL(realm).copy_merge_params(params), headers=headers)

    def _token(self, response: httpx.Response, repo: str) -> str:
        body = response.read()
        if response.status_code in (401, 403):
            raise SourceError(self._refused(repo))
        if response.status_code != 200 or len(body) > _MAX_TOKEN_BYTES:
            raise SourceError(f"the token service of registry {self.host} answered {response.status_code}; try "
                              "again later or check the registry")
        try:
            data = json.loads(body)
            token = data.get("token") or data.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise SourceError(f"the token service of registry {self.host} sent no token")
        return token
