"""Wire types of the fleet control plane's ``/fleet/v1`` API, shared by the app, the typed client and the agent.

Validation only. Requests refuse unknown fields (a typo in an operator's script must not be dropped silently);
responses ignore them, so an older client reads a newer control plane.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+-]{0,31}$")  # a release's version
TAG_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,63}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
Role = Literal["admin", "operator", "viewer"]
Health = Literal["ok", "degraded", "failing", "unknown"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _tags(v: dict[str, str]) -> dict[str, str]:
    for key, value in v.items():
        if not TAG_RE.match(key) or not isinstance(value, str) or len(value) > 128:
            raise ValueError(f"tag {key!r}: keys are lowercase letters, digits and ._/- (64 at most), values "
                             "strings of 128 characters at most")
    if len(v) > 64:
        raise ValueError("at most 64 tags")
    return v


Tags = Annotated[dict[str, str], AfterValidator(_tags)]


# -- enrolment and the device protocol ------------------------------------------------------------------------

class EnrolmentTokenRequest(_Request):
    expires_in: str = Field("1h", description="a duration such as 10m, 1h or 7d")
    tags: Tags = Field(default_factory=dict, description="tags given to the device that uses it")


class EnrolmentTokenResponse(_Response):
    id: str
    token: str  # shown once
    expires_at: float


class EnrolRequest(_Request):
    token: str
    public_key: str = Field(description="the device's Ed25519 public key, raw 32 bytes as base64url")
    proof: str = Field(description="base64url Ed25519 signature over the token: the device holds the private key")
    name: str = Field(min_length=1, max_length=128)
    hardware: dict[str, Any] = Field(default_factory=dict, description="what `slmops hw --json` reports")
    agent_version: str = Field("", max_length=32)
    tags: Tags = Field(default_factory=dict)


class EnrolResponse(_Response):
    device_id: str
    hardware_class: str
    poll_interval_s: float
    server_time: float
    trust_root: dict[str, Any] | None = Field(None, description="the fleet's root metadata (TUF root.json): the "
                                              "keys the device trusts to sign its desired state")


class Golden(_Request):
    """A golden prompt: the answer must contain ``expect`` (case-insensitive) or match ``expect_regex``."""

    prompt: str = Field(min_length=1, max_length=4096)
    expect: str | None = Field(None, max_length=1024)
    expect_regex: str | None = Field(None, max_length=1024)
    max_tokens: int = Field(32, ge=1, le=512)


class ReleaseTarget(_Response):
    release: str  # NAME:VERSION
    variant: str  # the variant's hardware key
    reference: str  # host/namespace/model@sha256:...
    manifest_digest: str
    signature: str | None = None  # base64 of the model-signing bundle
    golden: list[Golden] = Field(default_factory=list)


class DesiredState(_Response):
    device_id: str
    version: int  # only moves forward for a device
    issued_at: float
    expires: float | None = None  # after this (control plane time) the document activates nothing
    release: ReleaseTarget | None = None
    config: dict[str, Any] = Field(default_factory=dict)  # the effective deployment config


# Bounds of the columns reports land in: one value out of them would fail a whole batch's transaction on PostgreSQL.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


class Running(_Request):
    release: str | None = Field(None, max_length=160)
    manifest_digest: str | None = Field(None, max_length=71)
    slot: str | None = Field(None, max_length=64)


class Window(_Request):
    """Aggregates over one window; no text of any prompt or answer. ``start`` identifies the window: a device
    reports each window once, and one sent again is not counted again."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    start: float
    end: float
    release: str | None = Field(None, max_length=160, description="the release these numbers are about when not "
                                "the running one: a device that failed to load or smoke-test a release reports "
                                "the failure against it while it keeps serving the one before")
    requests: int = Field(0, ge=0, le=INT32_MAX)
    errors: int = Field(0, ge=0, le=INT32_MAX)
    load_failures: int = Field(0, ge=0, le=INT32_MAX)
    oom: int = Field(0, ge=0, le=INT32_MAX)
    ttft_p50_ms: float | None = Field(None, ge=0)
    ttft_p95_ms: float | None = Field(None, ge=0)
    itl_p50_ms: float | None = Field(None, ge=0)
    itl_p95_ms: float | None = Field(None, ge=0)
    tokens_per_s: float | None = Field(None, ge=0)
    golden_score: float | None = Field(None, ge=0, le=1)
    memory_bytes: int | None = Field(None, ge=0, le=INT64_MAX)
    # counts per slmops.fleet.histogram bucket (trailing zeros dropped): the control plane sums them per class
    ttft_hist: list[Annotated[int, Field(ge=0, le=INT32_MAX)]] = Field(default_factory=list, max_length=64)
    itl_hist: list[Annotated[int, Field(ge=0, le=INT32_MAX)]] = Field(default_factory=list, max_length=64)


class ReportRequest(_Request):
    running: Running = Field(default_factory=Running)
    health: Health = "unknown"
    desired_version: int = Field(0, ge=0, le=INT64_MAX, description="the desired state the device has applied")
    windows: list[Window] = Field(default_factory=list, max_length=64)


class SessionResponse(_Response):
    """A session token for ``Authorization: Slmops-Session <token>``, valid until ``expires_at`` (the control
    plane's clock); renew it before then with another signed ``POST /fleet/v1/device/session``."""

    token: str
    expires_at: float


# -- operators ----------------------------------------------------------------------------------------------

class DeviceInfo(_Response):
    id: str
    name: str
    hardware_class: str
    agent_version: str
    tags: dict[str, str]
    groups: list[str] = Field(default_factory=list)
    enrolled_at: float
    last_seen: float
    revoked: bool
    running_release: str | None
    health: str
    desired_version: int


class TagsRequest(_Request):
    tags: dict[str, str | None] = Field(description="tags to set; null removes one")


class GroupRequest(_Request):
    selector: Tags = Field(description="tags a device must all have to be in the group")


class GroupInfo(_Response):
    name: str
    selector: dict[str, str]
    devices: int = 0


class VariantSpec(_Request):
    hardware: str = Field(description="a hardware class (cpu-x86_64), an accelerator (cpu, cuda) or *")
    reference: str = Field(description="the variant's model in a registry: host/namespace/model:tag or @sha256:…")
    manifest_digest: str | None = Field(None, description="pinned digest; resolved from the registry when absent")
    signature: str | None = Field(None, description="base64 model-signing bundle; fetched from the registry "
                                                    "(sha256-<hex>.sig) when absent")

    @field_validator("manifest_digest")
    @classmethod
    def _digest(cls, v: str | None) -> str | None:
        if v is not None and not DIGEST_RE.match(v):
            raise ValueError("must be sha256:<64 hex>")
        return v


class ReleaseRequest(_Request):
    name: str
    version: str = Field(pattern=VERSION_RE.pattern)
    variants: list[VariantSpec] = Field(min_length=1, max_length=32)
    golden: list[Golden] = Field(default_factory=list, max_length=64)
    notes: str = Field("", max_length=4096)


class VariantInfo(_Response):
    hardware: str
    reference: str
    manifest_digest: str
    signed: bool


class ReleaseInfo(_Response):
    release: str  # NAME:VERSION
    name: str
    version: str
    variants: list[VariantInfo]
    golden: list[Golden]
    notes: str = ""
    created_at: float
    created_by: str


class ChannelRequest(_Request):
    release: str = Field(description="NAME:VERSION")


class ChannelInfo(_Response):
    name: str
    release: str
    updated_at: float


class BlueprintRequest(_Request):
    priority: int = Field(0, ge=-1000, le=1000, description="among group layers, higher wins")
    config: dict[str, Any] = Field(description="a partial deployment config (config/deploy.py's shape), plus "
                                                "`channel`: the channel whose release the devices run")


class BlueprintInfo(_Response):
    layer: str  # baseline | group:<name> | device:<id>
    priority: int
    config: dict[str, Any]
    updated_at: float
    updated_by: str


class EffectiveConfig(_Response):
    device_id: str
    config: dict[str, Any]
    sources: dict[str, str] = Field(description="dotted key -> the layer its value came from")


class LedgerInfo(_Response):
    seq: int
    at: float
    actor: str
    action: str
    subject: str
    data: dict[str, Any]
    prev: str
    hash: str


class LedgerVerdict(_Response):
    ok: bool
    entries: int
    problem: str | None = None


class KeyRequest(_Request):
    name: str
    role: Role


class KeyInfo(_Response):
    id: str
    name: str
    role: str
    created_at: float
    revoked: bool
    key: str | None = None  # only when just created


class ErrorBody(_Response):
    error: str


# -- admin --------------------------------------------------------------------------------------------------

class TokenInfo(_Response):
    """An enrolment token as listed: never its secret (only its sha256 is stored)."""

    id: str
    expires_at: float
    tags: dict[str, str]
    created_by: str
    created_at: float
    used_at: float | None = None
    used_by: str | None = None


class DevicePage(_Response):
    devices: list[DeviceInfo]
    next: str | None = Field(None, description="pass as ?after= for the next page; null on the last one")


# -- signed desired state (TUF-style metadata) -------------------------------------------------------------

class MetadataSignature(_Response):
    keyid: str
    sig: str  # hex, as TUF writes signatures


class SignedDesired(_Response):
    """What ``GET /device/desired`` serves: ``signed`` is a :class:`DesiredState` document with ``_type``
    ``"slmops-desired"``; ``signatures`` are over its canonical JSON (OLPC canonical JSON, as TUF signs) by keys
    of the ``targets`` role of the root the device was enrolled with."""

    signed: dict[str, Any]
    signatures: list[MetadataSignature]


# -- rollouts -----------------------------------------------------------------------------------------------

class RolloutRequest(_Request):
    release: str = Field(description="NAME:VERSION of a release")
    group: str = Field(description="the group whose devices take the release")
    waves: list[float] | None = Field(None, min_length=1, max_length=32,
                                      description="cumulative percent of each hardware class per wave, such as "
                                                  "[1, 10, 50, 100]")
    base_percent: float | None = Field(None, gt=0, le=100, description="IoT-Jobs style: the first wave's percent "
                                                                        "(instead of waves)")
    increment_factor: float | None = Field(None, gt=1, le=100, description="each next wave is this many times "
                                                                            "the one before, up to 100%")
    bake: str = Field("60s", description="how long each wave must pass its gates before the next one starts")
    min_devices: int = Field(1, ge=1, description="devices of a class that must report before it is judged")
    min_requests: int = Field(0, ge=0, description="requests they must have served")
    gates: list[str] | None = Field(None, max_length=32,
                                    description='gates such as "error_rate < 0.02" or "ttft_p95 <= 1.2 x previous"; '
                                                "the defaults when absent")


class RolloutClass(_Response):
    hardware_class: str
    status: str  # active | done | failed | aborted
    wave: int  # 1-based
    share: float  # the share of the class's devices targeted now
    devices: dict[str, int] = Field(default_factory=dict,
                                    description="total, targeted, applied (reached the version), running the "
                                                "release, failing")
    gates: list[dict[str, Any]] = Field(default_factory=list, description="the latest gate results")


class RolloutInfo(_Response):
    id: str
    release: str
    group: str
    status: str  # running | paused | completed | aborted
    created_at: float
    created_by: str
    plan: dict[str, Any]
    classes: list[RolloutClass]


class PromoteRequest(_Request):
    hardware_class: str | None = Field(None, description="one class to take to the last wave; all when absent")
