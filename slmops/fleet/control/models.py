"""The control plane's tables (SQLAlchemy 2). Alembic's migrations (``migrations/``) create them; the metadata here
is what ``alembic check`` compares them with.

Times are seconds since the epoch as floats: the same on SQLite and PostgreSQL, cheap to compare in SQL, and
free of time-zone mistakes. Documents that are read whole (hardware profiles, tags, blueprint layers, golden
prompts, ledger data) are JSON columns; what gates and filters query (release, hardware class, health, the
report aggregates) has columns of its own, with indexes where a filter needs one.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (JSON, BigInteger, Float, ForeignKey, Index, Integer, LargeBinary, MetaData, SmallInteger, String,
                        Text, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


# Constraint names fixed by convention, the same on SQLite and PostgreSQL, so a later migration can name the one it
# drops or alters (SQLite's batch mode needs a name).
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # dev_<12 hex>
    name: Mapped[str] = mapped_column(String(128))
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32))  # raw Ed25519
    hardware: Mapped[dict[str, Any]] = mapped_column(default=dict)
    hardware_class: Mapped[str] = mapped_column(String(64), index=True)
    agent_version: Mapped[str] = mapped_column(String(32), default="")
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict)
    enrolled_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float, index=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, default=None)
    # what the device last reported
    running_release: Mapped[str | None] = mapped_column(String(160), default=None, index=True)  # NAME:VERSION
    running_digest: Mapped[str | None] = mapped_column(String(71), default=None)
    health: Mapped[str] = mapped_column(String(16), default="unknown", index=True)  # ok|degraded|failing|unknown
    # what it was last told: the version only moves forward (anti-rollback); the hash says whether it changed
    desired_version: Mapped[int] = mapped_column(BigInteger, default=0)
    desired_hash: Mapped[str] = mapped_column(String(64), default="")
    # the desired version the device last reported applied (rollouts count devices that reached a version)
    applied_version: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class EnrolmentToken(Base):
    __tablename__ = "enrolment_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the secret
    expires_at: Mapped[float] = mapped_column(Float)
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float, default=None)
    used_by: Mapped[str | None] = mapped_column(String(32), default=None)


class Group(Base):
    __tablename__ = "groups"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    selector: Mapped[dict[str, Any]] = mapped_column(default=dict)  # tag -> value; all must match
    created_at: Mapped[float] = mapped_column(Float)


class Release(Base):
    __tablename__ = "releases"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(32))
    golden: Mapped[list[Any]] = mapped_column(default=list)  # [{prompt, expect | expect_regex, ...}]
    notes: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)


class Variant(Base):
    __tablename__ = "variants"
    __table_args__ = (UniqueConstraint("release_id", "hardware"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id", ondelete="CASCADE"), index=True)
    hardware: Mapped[str] = mapped_column(String(64))  # a hardware class, an accelerator, or "*"
    reference: Mapped[str] = mapped_column(String(512))  # host/namespace/model@sha256:...
    manifest_digest: Mapped[str] = mapped_column(String(71))
    signature: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)  # model-signing bundle


class Channel(Base):
    __tablename__ = "channels"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"))
    updated_at: Mapped[float] = mapped_column(Float)


class Blueprint(Base):
    """One layer. ``layer`` is ``baseline``, ``group:<name>`` or ``device:<id>``; higher priority wins among
    group layers; the baseline is under every group, a device layer over them all."""

    __tablename__ = "blueprints"

    layer: Mapped[str] = mapped_column(String(128), primary_key=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    updated_at: Mapped[float] = mapped_column(Float)
    updated_by: Mapped[str] = mapped_column(String(64))


class OperatorKey(Base):
    __tablename__ = "operator_keys"

    id: Mapped[str] = mapped_column(String(12), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # admin | operator | viewer
    salt: Mapped[str] = mapped_column(String(32))
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, default=None)


class LedgerEntry(Base):
    """Append-only and hash-chained as the audit log (``security/audit.py``): ``hash`` is sha256 of the entry's
    canonical JSON without it, ``prev`` the previous entry's hash."""

    __tablename__ = "ledger"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[float] = mapped_column(Float)
    actor: Mapped[str] = mapped_column(String(80))  # key:<name> (names up to 64), device:<id>, system
    action: Mapped[str] = mapped_column(String(64), index=True)
    subject: Mapped[str] = mapped_column(String(200), index=True)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    prev: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class Report(Base):
    """One device's aggregates for one window. No prompt or output text has a column here."""

    __tablename__ = "reports"
    __table_args__ = (Index("ix_reports_release_class", "release", "hardware_class", "window_end"),
                      # one row per device and window: a replayed report adds nothing (reports.py inserts with
                      # ON CONFLICT DO NOTHING); also the index of a device's reports
                      UniqueConstraint("device_id", "window_start"))

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(32))
    received_at: Mapped[float] = mapped_column(Float)
    window_start: Mapped[float] = mapped_column(Float)
    window_end: Mapped[float] = mapped_column(Float)
    release: Mapped[str | None] = mapped_column(String(160))
    hardware_class: Mapped[str] = mapped_column(String(64))
    requests: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[int] = mapped_column(Integer, default=0)
    load_failures: Mapped[int] = mapped_column(Integer, default=0)
    oom: Mapped[int] = mapped_column(Integer, default=0)
    ttft_p50_ms: Mapped[float | None] = mapped_column(Float, default=None)
    ttft_p95_ms: Mapped[float | None] = mapped_column(Float, default=None)
    itl_p50_ms: Mapped[float | None] = mapped_column(Float, default=None)
    itl_p95_ms: Mapped[float | None] = mapped_column(Float, default=None)
    tokens_per_s: Mapped[float | None] = mapped_column(Float, default=None)
    golden_score: Mapped[float | None] = mapped_column(Float, default=None)
    memory_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)


class ReportBucket(Base):
    """One nonzero latency histogram bucket of one report window (``slmops.fleet.histogram``'s buckets): gates sum
    the counts per hardware class and bucket in SQL and read percentiles from the sums. ``release``,
    ``hardware_class`` and ``window_end`` repeat the window's, so the sums need no join; the index also carries
    metric, bucket and count, so they read the index alone (half the time of a lookup per row on SQLite)."""

    __tablename__ = "report_buckets"
    __table_args__ = (Index("ix_report_buckets_release_class", "release", "hardware_class", "window_end", "metric",
                            "bucket", "count"),)

    device_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    window_start: Mapped[float] = mapped_column(Float, primary_key=True)
    metric: Mapped[int] = mapped_column(SmallInteger, primary_key=True)  # 0 ttft, 1 itl
    bucket: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    release: Mapped[str | None] = mapped_column(String(160))
    hardware_class: Mapped[str] = mapped_column(String(64))
    window_end: Mapped[float] = mapped_column(Float)
    count: Mapped[int] = mapped_column(Integer)


class Rollout(Base):
    """A wave rollout of a release to a group. ``state`` is ``rollouts.Rollout.to_json()`` (plan, classes, waves);
    ``status`` repeats its status for queries; ``previous``: per hardware class, the release its devices' channel
    gave them when the rollout started (what relative gates compare with)."""

    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # ro_<12 hex>
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"), index=True)
    group: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)  # running | paused | completed | aborted
    state: Mapped[dict[str, Any]] = mapped_column(default=dict)
    previous: Mapped[dict[str, Any]] = mapped_column(default=dict)  # hardware class -> NAME:VERSION or null
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(80))
    updated_at: Mapped[float] = mapped_column(Float)


class RolloutAssignment(Base):
    """A device a rollout targeted (put in a wave). Live until ``reverted_at`` is set; a live assignment gives the
    device the rollout's release. ``from_version``: the device's desired version when it was assigned, so a
    device that reports a later version applied has seen the release."""

    __tablename__ = "rollout_assignments"
    __table_args__ = (Index("ix_rollout_assignments_device_live", "device_id", "reverted_at"),)

    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    hardware_class: Mapped[str] = mapped_column(String(64))
    wave: Mapped[int] = mapped_column(Integer)  # 1-based
    assigned_at: Mapped[float] = mapped_column(Float)
    from_version: Mapped[int] = mapped_column(BigInteger, default=0)
    reverted_at: Mapped[float | None] = mapped_column(Float, default=None)


class Meta(Base):
    """``change_version``: bumped in the same transaction as every mutation; replicas poll it (or are told by
    PostgreSQL's NOTIFY) to drop what they cached."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class ChangeScope(Base):
    """Which devices a change version concerns, for changes that concern only some (a wave assigned, a class
    reverted, a device enrolled, retagged or revoked); a version with no row here concerns everything. Replicas
    read these to drop only those devices' cached states, not the whole fleet's; rows older than
    ``db.SCOPES_KEPT`` versions are pruned, and a replica that finds one missing drops everything."""

    __tablename__ = "change_scopes"

    version: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    devices: Mapped[list[Any]] = mapped_column(default=list)


class ServerSecret(Base):
    """The control plane's own secrets, shared by its replicas through the database. ``session``: the HMAC keys of
    device session tokens (``deviceauth``), one per epoch, the newest making new tokens. Never logged, never in
    the ledger, never served."""

    __tablename__ = "server_secrets"

    purpose: Mapped[str] = mapped_column(String(32), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary(64))
    created_at: Mapped[float] = mapped_column(Float)


class Feedback(Base):
    """A rated answer a device uploaded because its blueprint opted in (``privacy.feedback: true``): the one table
    that holds prompt and answer text. One row per device and record id, so an upload sent again adds nothing;
    exports read a release's rows in ``id`` order."""

    __tablename__ = "feedback"
    __table_args__ = (Index("ix_feedback_release_id", "release", "id"), UniqueConstraint("device_id", "record_id"))

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(32))
    record_id: Mapped[str] = mapped_column(String(32))  # fb_<24 hex>, made by the device
    release: Mapped[str] = mapped_column(String(160))
    model: Mapped[str] = mapped_column(String(160))
    hardware_class: Mapped[str] = mapped_column(String(64))
    rating: Mapped[int] = mapped_column(Integer)  # 1 good, -1 bad
    at: Mapped[float] = mapped_column(Float)  # when it was rated (the device's clock)
    received_at: Mapped[float] = mapped_column(Float)
    messages: Mapped[list[Any]] = mapped_column(default=list)  # [{role, content}], the rated answer last
    comment: Mapped[str | None] = mapped_column(Text, default=None)
    tags: Mapped[list[Any]] = mapped_column(default=list)
