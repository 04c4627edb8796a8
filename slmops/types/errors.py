"""The one exception tree of slmops.

Every error a user can meet is a subclass of :class:`SlmopsError` whose message is a single line that says what
to do next. Layers raise these; only the edges (CLI, HTTP handlers) turn them into exit codes or HTTP statuses,
each through one table keyed by class, never by message text.

    SlmopsError
    ├── InvalidInput            bad request from the user (HTTP 400)
    │   ├── InvalidName         a model name outside the grammar
    │   ├── InvalidDigest       anything but ``sha256:<64 hex>``
    │   ├── ModelfileError      a Modelfile that does not parse (names the line)
    │   ├── TemplateError       a chat template that cannot be used
    │   ├── InvalidOption       an unknown or ill-typed option
    │   ├── InvalidModelFile    a GGUF that fails validation (truncated, crafted)
    │   ├── ContextOverflow     a prompt longer than the context window
    │   ├── Unsupported         a capability the model's backend lacks (embeddings, a kind of constraint...)
    │   └── Conflict            the change contradicts what is stored (HTTP 409): a channel moved backwards
    ├── Unauthenticated         no credentials, or ones that do not hold (HTTP 401): a device's signature
    ├── Forbidden               the caller's role does not allow it (HTTP 403)
    ├── NotFound                (HTTP 404)
    │   └── ModelNotFound
    ├── IntegrityError          content whose digest differs from the pinned one (HTTP 400)
    │   └── UntrustedModel      unsigned, or not signed by a trusted key (HTTP 403)
    ├── SourceError             a model source failed (download, missing file)
    ├── ConfigError             a bad SLMOPS_* value or settings file
    ├── Busy                    the engine cannot take more work now (HTTP 503)
    ├── RateLimited             the caller's key is over its limit now (HTTP 429, ``retry_after`` seconds)
    ├── TooLarge                a body or upload over its size limit (HTTP 413)
    └── EngineError             llama.cpp failed (HTTP 500)
        ├── OutOfMemory         memory ran out: a context or compute buffer could not be allocated
        └── RunnerCrashed       a model's runner process died; its requests failed, the next one restarts it
            └── RunnerOutOfMemory   ... killed by SIGKILL, which on Linux is the kernel's OOM killer
"""

from __future__ import annotations


class SlmopsError(Exception):
    """Base of every error slmops raises on purpose; ``str(err)`` is the one-line user message."""


class InvalidInput(SlmopsError):
    pass


class InvalidName(InvalidInput):
    pass


class InvalidDigest(InvalidInput):
    pass


class ModelfileError(InvalidInput):
    def __init__(self, message: str, line: int | None = None):
        self.line = line
        super().__init__(f"Modelfile line {line}: {message}" if line else message)


class TemplateError(InvalidInput):
    pass


class InvalidOption(InvalidInput):
    pass


class InvalidModelFile(InvalidInput):
    pass


class ContextOverflow(InvalidInput):
    @classmethod
    def prompt(cls, n_prompt: int, n_ctx: int, n_ctx_train: int | None = None) -> ContextOverflow:
        """The one wording for a prompt that does not fit, whichever loop finds it first."""
        most = f" (this model supports up to {n_ctx_train})" if n_ctx_train else ""
        return cls(f"prompt is {n_prompt} tokens but the context holds {n_ctx} (num_ctx); shorten the prompt or "
                   f"raise num_ctx{most}")


class Unsupported(InvalidInput):
    """A request needs what the model's backend does not offer; ``capability`` names it (crossing a runner's
    pipe keeps the class and message, not the attribute)."""

    capability: str = ""

    def __init__(self, capability: str, backend: str):
        self.capability = capability
        super().__init__(f"the {backend} backend this model runs on does not support {capability}")


class Conflict(InvalidInput):
    pass


class Unauthenticated(SlmopsError):
    pass


class Forbidden(SlmopsError):
    pass


class NotFound(SlmopsError):
    pass


class ModelNotFound(NotFound):
    def __init__(self, name: str):
        self.name = name
        super().__init__(f'model "{name}" not found, try pulling it first')


class IntegrityError(SlmopsError):
    pass


class UntrustedModel(IntegrityError):
    pass


class SourceError(SlmopsError):
    pass


class ConfigError(SlmopsError):
    pass


class Busy(SlmopsError):
    pass


class RateLimited(SlmopsError):
    def __init__(self, message: str, retry_after: float):
        self.retry_after = retry_after
        super().__init__(message)


class TooLarge(SlmopsError):
    pass


class EngineError(SlmopsError):
    pass


class OutOfMemory(EngineError):
    """Counted apart from other engine errors (``slmops_model_failures{kind="oom"}``): a fleet gates on OOM per
    hardware class, since a variant that fits one class's memory may not fit another's."""


class RunnerCrashed(EngineError):
    pass


class RunnerOutOfMemory(RunnerCrashed, OutOfMemory):
    pass
