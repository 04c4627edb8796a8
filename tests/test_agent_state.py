"""The agent's persisted state: a round trip through the file, the bounded report queue, slots by content, and a
damaged file that says what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmops.fleet.agent.state import AgentState, Pending, SlotState, state_file
from slmops.types.errors import ConfigError


def test_state_round_trips_through_its_file(tmp_path: Path) -> None:
    path = state_file(tmp_path)
    assert path == tmp_path / "fleet" / "agent.json"
    assert AgentState.load(path) == AgentState()  # none yet: a fresh agent
    st = AgentState(served="smol", active="b", applied_version=7, etag='"7.abc"', health="ok",
                    slots={"a": SlotState("slot/smol-a:1", "smol:1", "sha256:" + "1" * 64),
                           "b": SlotState("slot/smol-b:2", "smol:2", "sha256:" + "2" * 64)},
                    pending=Pending("smol:2", 1000.5, "a"), failed={"smol:3@sha256:" + "3" * 64: 999.0})
    st.enqueue([{"start": 1.0, "end": 2.0, "requests": 3}])
    st.save(path)
    back = AgentState.load(path)
    assert back == st
    assert back.idle == "a" and back.holding("sha256:" + "1" * 64) == "a" and back.holding("sha256:" + "9" * 64) is None
    assert not list(path.parent.glob(".tmp-*"))  # written atomically: no temp file left


def test_the_report_queue_keeps_the_newest_windows_and_counts_the_dropped() -> None:
    st = AgentState()
    st.enqueue([{"start": float(i)} for i in range(5)], limit=8)
    st.enqueue([{"start": float(i)} for i in range(5, 12)], limit=8)
    assert [w["start"] for w in st.queue] == [float(i) for i in range(4, 12)] and st.dropped == 4


def test_the_active_slot_is_preferred_when_both_hold_the_same_model() -> None:
    same = "sha256:" + "4" * 64
    st = AgentState(active="b", slots={"a": SlotState("slot/x-a:1", "x:1", same), "b": SlotState("slot/x-b:2", "x:2",
                                                                                                    same)})
    assert st.holding(same) == "b"
    assert AgentState().idle == "a"  # a fresh device stages its first release in slot a


@pytest.mark.parametrize("content", [b"{broken", b'{"slots": {"a": {"model": 1}}}', b'{"unknown_field": 1}'])
def test_a_damaged_state_file_says_what_to_do(tmp_path: Path, content: bytes) -> None:
    path = state_file(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="remove it"):
        AgentState.load(path)


def test_agent_status_shows_the_state_without_the_network(tmp_path: Path) -> None:
    import json

    from conftest import run_cli
    st = AgentState(served="smol", active="b", applied_version=7, health="ok",
                    slots={"a": SlotState("slot/smol-a:1", "smol:1", "sha256:" + "1" * 64),
                           "b": SlotState("slot/smol-b:2", "smol:2", "sha256:" + "2" * 64)},
                    pending=Pending("smol:2", 1.0, "a"), failed={"smol:3@sha256:" + "3" * 64: 2.0},
                    last_error="control plane: cannot reach the control plane at http://cp:11500")
    st.enqueue([{"start": 1.0}, {"start": 2.0}])
    st.save(state_file(tmp_path))
    shown = run_cli("agent", "status", home=tmp_path)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "served   smol -> slot b: slot/smol-b:2 (smol:2)"
    assert lines[1] == "idle     slot a: slot/smol-a:1 (smol:1)"
    assert lines[2].startswith("health   window of smol:2 open for") and lines[2].endswith("switches back to slot a "
                                                                                        "on failures")
    assert lines[3] == "health   ok; desired version 7 applied"
    assert lines[4].startswith("failed   smol:3 (")
    assert lines[5:] == ["reports  2 window(s) queued",
                         "last     control plane: cannot reach the control plane at http://cp:11500"]
    doc = json.loads(run_cli("agent", "status", "--json", home=tmp_path).stdout)
    assert doc["queue"] == 2 and doc["active"] == "b" and doc["pending"]["previous"] == "a"
