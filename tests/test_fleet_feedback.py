"""Rated feedback across the fleet, on SQLite and a real PostgreSQL, in process through the device client: a device
uploads only when its effective blueprint opts in (checked again by the control plane), each record once; the
agent's upload sends what is pending in bounded batches and drops it from the device; operators export per release
as JSONL, and the ledger records who did. Reports, the telemetry every device sends, have no field for text."""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fleet_app import BASE_URL, run, serving
from fleet_db import fleet_db_url, postgres  # noqa: F401
from sqlalchemy import func, select

from slmops.api.feedback import FeedbackMessage, FeedbackRecord
from slmops.api.fleet import ReportRequest
from slmops.client import DeviceClient
from slmops.fleet import privacy
from slmops.fleet.agent.feedback import upload_pending
from slmops.fleet.control import blueprints, operators
from slmops.fleet.control.app import ControlPlane
from slmops.fleet.control.db import Database
from slmops.fleet.control.models import Blueprint, EnrolmentToken, Feedback, LedgerEntry
from slmops.fleet.control.reports import parse_report
from slmops.fleet.control.routes_admin import token_hash
from slmops.fleet.deviceauth import DeviceKey
from slmops.store.feedback import FeedbackLog
from slmops.types.errors import Forbidden, InvalidInput

PROFILE = {"cpu": {"architecture": "x86_64"}, "gpus": []}
OPT_IN = {"channel": "stable", "privacy": {"feedback": True}}
RELEASE = "smol:1.2.0"


@dataclass
class Fleet:
    plane: ControlPlane
    transport: httpx.ASGITransport
    operator_key: str
    viewer_key: str

    async def device(self) -> DeviceClient:
        secret = f"slmenrol_{secrets.token_urlsafe(24)}"
        async with self.plane.db.write() as s:
            s.add(EnrolmentToken(id=f"tok_{secret[-12:].lower()}", token_hash=token_hash(secret),
                                 expires_at=time.time() + 3600, tags={}, created_by="key:ops", created_at=time.time()))
        client = DeviceClient(BASE_URL, DeviceKey.generate(), transport=self.transport)
        await client.enrol(secret, name="edge", hardware=PROFILE)
        return client

    async def layer(self, config: dict[str, Any], layer: str = "baseline") -> None:
        async with self.plane.db.write() as s:
            found = await s.get(Blueprint, layer)
            if found is None:
                s.add(Blueprint(layer=layer, priority=0, config=config, updated_at=time.time(), updated_by="key:ops"))
            else:
                found.config = config

    async def stored(self) -> list[Feedback]:
        async with self.plane.db.read() as s:
            return list((await s.execute(select(Feedback).order_by(Feedback.id))).scalars())

    def operator(self, key: str | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self.transport, base_url=BASE_URL,
                                 headers={"Authorization": f"Bearer {key or self.operator_key}"})


@contextlib.asynccontextmanager
async def fleet(url: str) -> AsyncIterator[Fleet]:
    plane = ControlPlane(Database(url), rollout_tick_s=0)
    async with serving(plane) as transport:
        keys = [await operators.create_key(plane.db, role, role, "host:test") for role in ("operator", "viewer")]
        yield Fleet(plane, transport, *keys)


def records(n: int, release: str = RELEASE, start: float = 1_750_000_000.0) -> list[FeedbackRecord]:
    """``n`` ratings rated a second apart from ``start``; the same arguments make the same records (ids too)."""
    return [FeedbackRecord(id="fb_" + hashlib.sha256(f"{release} {start + i}".encode()).hexdigest()[:24],
                           at=start + i, release=release, model="smol", rating=1 if i % 2 else -1,
                           messages=[FeedbackMessage(role="user", content=f"question {i}"),
                                     FeedbackMessage(role="assistant", content=f"answer {i}")],
                           comment="why" if i == 0 else None) for i in range(n)]


# -- uploads ---------------------------------------------------------------------------------------------------------
def test_an_upload_is_refused_without_an_opt_in_in_the_blueprint(fleet_db_url: str) -> None:
    async def scenario() -> None:
        async with fleet(fleet_db_url) as f:
            device = await f.device()
            await f.layer({"channel": "stable"})
            with pytest.raises(Forbidden, match=r"not opted in to feedback: set `privacy: \{feedback: true\}`"):
                await device.feedback(records(2))
            await f.layer({"privacy": {"feedback": False}}, f"device:{device.device_id}")
            await f.layer(OPT_IN)  # the device's own layer says no, and it wins over the baseline
            with pytest.raises(Forbidden):
                await device.feedback(records(2))
            assert await f.stored() == []
            await device.aclose()

    run(scenario())


def test_an_opted_in_device_uploads_and_each_record_is_stored_once(fleet_db_url: str) -> None:
    async def scenario() -> None:
        async with fleet(fleet_db_url) as f:
            device = await f.device()
            await f.layer(OPT_IN)
            batch = records(3)
            answer = await device.feedback(batch)
            assert (answer.received, answer.stored) == (3, 3)
            again = await device.feedback(batch[1:] + records(1, start=1_760_000_000.0))
            assert (again.received, again.stored) == (3, 1)  # a retry after a lost answer adds nothing
            rows = await f.stored()
            assert [r.record_id for r in rows[:3]] == [r.id for r in batch] and len(rows) == 4
            first = rows[0]
            assert (first.device_id, first.hardware_class, first.release, first.rating) == \
                (device.device_id, "cpu-x86_64", RELEASE, -1)
            assert first.messages == [m.model_dump() for m in batch[0].messages] and first.comment == "why"
            with pytest.raises(InvalidInput, match="records"):
                await device.feedback(records(101))  # one upload is bounded
            await device.aclose()

    run(scenario())


def test_unauthenticated_uploads_are_refused(fleet_db_url: str) -> None:
    async def scenario() -> None:
        async with fleet(fleet_db_url) as f:
            await f.layer(OPT_IN)
            async with httpx.AsyncClient(transport=f.transport, base_url=BASE_URL) as raw:
                body = json.dumps({"records": [json.loads(r.model_dump_json()) for r in records(1)]})
                r = await raw.post("/fleet/v1/device/feedback", content=body)
                assert r.status_code == 401
            assert await f.stored() == []

    run(scenario())


# -- the agent's side ------------------------------------------------------------------------------------------------
def test_the_agent_uploads_pending_feedback_in_bounded_batches_and_drops_what_was_sent(fleet_db_url: str,
                                                                                       tmp_path: Path) -> None:
    async def scenario() -> None:
        async with fleet(fleet_db_url) as f:
            device = await f.device()
            log = FeedbackLog(tmp_path / "feedback")
            for record in records(230) + records(5, release="smol:1.3.0"):
                log.append(record)
            await f.layer(OPT_IN)
            assert await upload_pending(device, tmp_path) == 0  # the device has not applied the opt-in yet
            privacy.apply(tmp_path, OPT_IN)  # what the agent does with the desired state's config
            assert await upload_pending(device, tmp_path, max_batches=2) == 200  # two uploads of at most 100
            assert len(await f.stored()) == 200
            assert [r.id for r in log.records()] == [r.id for r in records(230)[200:] + records(5, "smol:1.3.0")]
            assert await upload_pending(device, tmp_path) == 35
            assert await upload_pending(device, tmp_path) == 0
            assert list(log.records()) == [] and log.files() == []  # nothing of the text is left on the device
            assert sorted({r.release for r in await f.stored()}) == [RELEASE, "smol:1.3.0"]
            await device.aclose()

    run(scenario())


def test_a_withdrawn_opt_in_keeps_feedback_on_the_device(fleet_db_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with fleet(fleet_db_url) as f:
            device = await f.device()
            log = FeedbackLog(tmp_path / "feedback")
            for record in records(3):
                log.append(record)
            privacy.apply(tmp_path, OPT_IN)
            await f.layer({"channel": "stable"})  # withdrawn before the device applied the change
            with pytest.raises(Forbidden):
                await upload_pending(device, tmp_path)
            assert len(list(log.records())) == 3 and await f.stored() == []
            privacy.apply(tmp_path, {"channel": "stable"})  # applied: nothing is even tried
            assert await upload_pending(device, tmp_path) == 0
            pending, cursor = log.pending(log.path(RELEASE), 100, 1 << 20)
            assert len(pending) == 3 and cursor is not None
            await device.aclose()

    run(scenario())


# -- export ----------------------------------------------------------------------------------------------------------
def test_operators_export_a_release_as_jsonl_and_the_ledger_says_who(fleet_db_url: str) -> None:
    async def scenario() -> None:
        async with fleet(fleet_db_url) as f:
            device = await f.device()
            await f.layer(OPT_IN)
            await device.feedback(records(3) + records(2, release="smol:1.3.0", start=1_760_000_000.0))
            async with f.operator() as c:
                r = await c.get("/fleet/v1/feedback", params={"release": RELEASE})
                assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
                lines = [json.loads(line) for line in r.text.splitlines()]
                assert [x["id"] for x in lines] == [x.id for x in records(3)]
                for x in lines:
                    assert {"messages", "rating", "release", "at", "id", "device_id", "hardware_class"} <= set(x)
                    assert x["release"] == RELEASE and x["messages"][-1]["role"] == "assistant"
                    assert x["device_id"] == device.device_id
                since = await c.get("/fleet/v1/feedback", params={"since": 1_760_000_000.5})
                assert [json.loads(line)["release"] for line in since.text.splitlines()] == ["smol:1.3.0"]
                everything = await c.get("/fleet/v1/feedback")
                assert len(everything.text.splitlines()) == 5
            async with f.operator(f.viewer_key) as viewer:
                refused = await viewer.get("/fleet/v1/feedback")
                assert refused.status_code == 403 and "needs operator" in refused.json()["error"]
            async with f.plane.db.read() as s:
                exports = list((await s.execute(select(LedgerEntry).where(LedgerEntry.action == "feedback.export")
                                                .order_by(LedgerEntry.seq))).scalars())
            assert [(e.actor, e.subject) for e in exports] == [("key:operator", f"release:{RELEASE}"),
                                                               ("key:operator", "feedback"),
                                                               ("key:operator", "feedback")]
            await device.aclose()

    run(scenario())


def test_an_export_streams_in_pages(fleet_db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from slmops.fleet.control import routes_feedback

    monkeypatch.setattr(routes_feedback, "PAGE", 7)

    async def scenario() -> None:
        async with fleet(fleet_db_url) as f:
            device = await f.device()
            await f.layer(OPT_IN)
            await device.feedback(records(30))
            async with f.operator() as c:
                lines = (await c.get("/fleet/v1/feedback", params={"release": RELEASE})).text.splitlines()
            assert [json.loads(line)["id"] for line in lines] == [r.id for r in records(30)]
            async with f.plane.db.read() as s:
                assert await s.scalar(select(func.count()).select_from(Feedback)) == 30
            await device.aclose()

    run(scenario())


# -- what never carries text -----------------------------------------------------------------------------------------
_TEXTUAL = {"prompt", "response", "messages", "content", "text", "comment", "output", "completion", "input"}


def _strings(schema: dict[str, Any], names: set[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Every string-typed property of a pydantic JSON schema, with its own schema, ``$defs`` resolved; ``names``
    gets every property name met."""
    defs = schema.get("$defs", {})
    found: list[tuple[str, dict[str, Any]]] = []

    def walk(node: Any, name: str) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].rsplit("/", 1)[-1]], name)
            if node.get("type") == "string":
                found.append((name, node))
            for key, value in node.get("properties", {}).items():
                if names is not None:
                    names.add(key)
                walk(value, key)
            for key in ("items", "anyOf", "allOf", "oneOf", "additionalProperties"):
                sub = node.get(key)
                for item in sub if isinstance(sub, list) else [sub]:
                    walk(item, name)

    walk(schema, "")
    return found


def test_a_report_has_no_field_for_text() -> None:
    names: set[str] = set()
    strings = _strings(ReportRequest.model_json_schema(), names)
    assert {name for name, _ in strings} == {"release", "manifest_digest", "slot", "health"}
    for name, node in strings:  # identifiers and enums, bounded: no room for a prompt or an answer
        assert "enum" in node or node.get("maxLength", 10**9) <= 160, name
    assert "windows" in names and "ttft_hist" in names and not _TEXTUAL & names
    for extra in ({"messages": [{"role": "user", "content": "secret"}]}, {"windows": [{"start": 0, "end": 1,
                                                                                      "prompt": "secret"}]}):
        with pytest.raises(InvalidInput, match="Extra inputs are not permitted"):
            parse_report(json.dumps(extra).encode())
    # the feedback record is where text goes, and only there
    assert {"content"} <= {name for name, _ in _strings(FeedbackRecord.model_json_schema())}


def test_a_blueprint_layer_takes_the_privacy_section_strictly() -> None:
    assert blueprints.check_layer(OPT_IN, "baseline") == OPT_IN
    with pytest.raises(InvalidInput, match=r"baseline: privacy.feedback: must be true or false; got 'yes'"):
        blueprints.check_layer({"privacy": {"feedback": "yes"}}, "baseline")
    with pytest.raises(InvalidInput, match="unknown key privacy.share; known keys: feedback"):
        blueprints.check_layer({"privacy": {"share": True}}, "baseline")


def test_what_no_database_column_holds_is_refused_with_400(fleet_db_url: str) -> None:
    async def scenario() -> None:
        async with fleet(fleet_db_url) as f:
            device = await f.device()
            await f.layer(OPT_IN)
            (good,) = records(1)
            for change in ({"comment": "a\x00b"}, {"release": "smol\x00"}, {"at": float("inf")}):
                bad = FeedbackRecord.model_construct(**{**dict(good), **change})
                with pytest.raises(InvalidInput):
                    await device.feedback([bad])
            assert await f.stored() == []
            await device.aclose()

    run(scenario())
