"""The switch's control plane without sockets: JOIN rules, READY, liveness, LEAVE, lifecycle, pool."""

from __future__ import annotations

import json

import numpy as np

import pytest

from switch_emulator._admission import Policy
from switch_emulator._config import ConfigError, SwitchConfig
from switch_emulator._golden import GoldenDataplane
from switch_emulator._jobs import (TRANSITIONS, ControlPlane, ErrorCode, JobEvent, JobState,
                                   LifecycleError, SlotPool)
from switchagg.packet import Kind, make_burst
from switchagg.protocol import (Abort, Error, Heartbeat, HeartbeatAck, Join, JoinOk, Leave, Query,
                                QueryReply, Ready, StatsReply, StatsRequest, encode_control)




def plane(total_slots: int = 1024, timeout: float = 3.0) -> ControlPlane:
    return ControlPlane(total_slots, 0.5, timeout, GoldenDataplane)


def join(cp: ControlPlane, who: bytes, job: str = "j", n: int = 2, k: int = 8, slots: int = 16,
         token: str = "", rank: int | None = None, now: float = 0.0):
    return cp.on_message(who, Join(job, n, k, slots, token, rank), now)


def only(replies, cls):
    assert len(replies) == 1, replies
    assert isinstance(replies[0][1], cls), replies
    return replies[0][1]


def error(replies, code: str, field: str | None = None) -> Error:
    err = only(replies, Error)
    assert err.code == code, err
    if field is not None:
        assert err.field == field, err
    return err


def running_job(cp: ControlPlane, n: int = 2, job: str = "j", now: float = 0.0, token: str = ""):
    ids = [f"{job}-w{r}".encode() for r in range(n)]
    for who in ids:
        join(cp, who, job=job, n=n, now=now, token=token)
    return cp.by_name[job], ids


# ------------------------------------------------------------------------------------------ JOIN


def test_join_first_creates_job_and_assigns_lowest_free_rank():
    cp = plane()
    ok = only(join(cp, b"a", n=3), JoinOk)
    assert (ok.job, ok.rank, ok.world_size, ok.k, ok.slots) == ("j", 0, 3, 8, 16)
    assert (ok.heartbeat_interval, ok.liveness_timeout) == (0.5, 3.0)
    assert only(join(cp, b"b", n=3, rank=2), JoinOk).rank == 2
    assert join(cp, b"c", n=3)[0][1].rank == 1
    assert cp.by_name["j"].state is JobState.RUNNING


def test_join_ready_sent_to_all_when_last_rank_joins():
    cp = plane()
    assert only(join(cp, b"a"), JoinOk).rank == 0
    replies = join(cp, b"b")
    assert isinstance(replies[0][1], JoinOk) and replies[0][0] == b"b"
    ready = replies[1:]
    assert sorted(who for who, _ in ready) == [b"a", b"b"]
    assert all(isinstance(m, Ready) and m.job_id == replies[0][1].job_id for _, m in ready)


def test_join_wrong_token_rejected_without_echoing_it():
    cp = plane()
    join(cp, b"a", token="secret")
    err = error(join(cp, b"b", token="guess"), ErrorCode.BAD_TOKEN, "token")
    assert "secret" not in err.message and "guess" not in err.message
    assert err.code in ErrorCode.JOIN_REJECTIONS


@pytest.mark.parametrize("field,kwargs", [("world_size", {"n": 4}), ("k", {"k": 16}),
                                          ("slots", {"slots": 32})])
def test_join_mismatch_names_field_and_both_values(field, kwargs):
    cp = plane()
    join(cp, b"a")
    err = error(join(cp, b"b", **kwargs), ErrorCode.MISMATCH, field)
    theirs, ours = {"world_size": (4, 2), "k": (16, 8), "slots": (32, 16)}[field]
    assert f"{field}={theirs}" in err.message and f"{field}={ours}" in err.message
    assert err.value == theirs


def test_join_duplicate_rank_rejected():
    cp = plane()
    join(cp, b"a", n=3, rank=1)
    error(join(cp, b"b", n=3, rank=1), ErrorCode.RANK_TAKEN, "rank")


def test_join_full_job_rejected_saying_it_still_runs_and_what_to_do():
    cp = plane()
    job, (a, _) = running_job(cp, n=2)
    job.creator = "10.0.0.7"
    cp.on_message(a, Leave(job.job_id, 0), 5.0)
    err = error(join(cp, b"late", now=12.4), ErrorCode.JOB_FULL, "job")
    assert err.message.startswith("job 'j' is still running with 2/2 workers, ranks [0] left "
                                  "(created 12 s ago from 10.0.0.7); choose another job name")
    assert "wait for it to end" in err.message


def test_join_mismatching_a_live_job_says_it_still_runs():
    cp = plane()
    join(cp, b"a", n=3)
    err = error(join(cp, b"b", n=2, now=3.0), ErrorCode.MISMATCH, "world_size")
    assert "job 'j' is still waiting for its workers with 1/3 workers" in err.message
    assert "another job name" in err.message


def test_join_rank_outside_world_size_is_malformed():
    cp = plane()
    frame = json.dumps({"type": "JOIN", "job": "j", "world_size": 2, "k": 8, "slots": 16,
                        "rank": 2}).encode()
    error(cp.on_control(b"a", frame, 0.0), ErrorCode.MALFORMED, "rank")
    assert cp.counters["malformed"] == {"control:rank": 1}
    assert not cp.jobs


def test_join_pool_exhausted_then_freed_by_abort():
    cp = plane(total_slots=40)
    join(cp, b"a", job="one", slots=32)
    err = error(join(cp, b"b", job="two", slots=16), ErrorCode.POOL_EXHAUSTED, "slots")
    assert "8 of 40 free" in err.message and "--slots" in err.message
    assert "two" not in cp.by_name
    cp.on_message(b"a", Leave(cp.by_name["one"].job_id, 0, "crashed"), 1.0)
    assert only(join(cp, b"b", job="two", slots=16), JoinOk).slots == 16


def test_join_lost_join_ok_resent_identically():
    cp = plane()
    first = only(join(cp, b"a"), JoinOk)
    assert only(join(cp, b"a"), JoinOk) == first
    join(cp, b"b")
    again = join(cp, b"a")
    assert again[0][1] == first and isinstance(again[1][1], Ready)
    assert len(cp.by_name["j"].members) == 2


def test_join_same_connection_for_other_job_rejected():
    cp = plane()
    join(cp, b"a")
    error(join(cp, b"a", job="other"), ErrorCode.ALREADY_JOINED, "job")
    error(join(cp, b"a", n=2, rank=1), ErrorCode.ALREADY_JOINED)


# ------------------------------------------------------------------------------------------ data


def test_admit_data_only_running_members_rate_limited_refusals():
    cp = plane()
    adm = cp.admit_data(b"stranger", 0.0)
    assert adm.job is None and only(adm.replies, Error).code == ErrorCode.NOT_JOINED
    assert cp.admit_data(b"stranger", 0.5).replies == []          # rate limited
    assert len(cp.admit_data(b"stranger", 1.6).replies) == 1
    assert cp.counters["unknown_sender"] == 3
    join(cp, b"a")
    adm = cp.admit_data(b"a", 2.0)
    assert adm.job is None and only(adm.replies, Error).code == ErrorCode.NOT_READY
    join(cp, b"b")
    adm = cp.admit_data(b"b", 2.0)
    assert adm.job is cp.by_name["j"] and adm.rank == 1 and adm.replies == []


# ------------------------------------------------------------------------------------------ liveness


def test_liveness_silent_worker_aborts_job_for_the_others():
    cp = plane(timeout=3.0)
    job, (a, b) = running_job(cp)
    slots_free = cp.pool.free
    assert cp.check_liveness(2.0) == []
    cp.on_message(a, Heartbeat(job.job_id, 0), 2.5)
    cp.admit_data(a, 3.5)                      # data refreshes liveness too
    replies = cp.check_liveness(3.2)           # b silent for 3.2 s
    assert sorted(who for who, _ in replies) == [a, b]
    abort = replies[0][1]
    assert isinstance(abort, Abort) and abort.rank == 1 and abort.job_id == job.job_id
    assert "rank 1" in abort.reason and "3.20 s" in abort.reason
    assert job.state is JobState.ABORTED and not cp.jobs and cp.pool.free == slots_free + 16
    # Later messages from the job's connections get ABORT again, telling them to re-join.
    later = only(cp.on_message(a, Heartbeat(job.job_id, 0), 4.0), Abort)
    assert later.reason.startswith("job aborted: rank 1") and later.reason.endswith("re-join")
    assert isinstance(cp.admit_data(b, 4.0).replies[0][1], Abort)


def test_liveness_heartbeat_acked_and_wrong_member_refused():
    cp = plane()
    job, (a, _) = running_job(cp)
    assert only(cp.on_message(a, Heartbeat(job.job_id, 0), 1.0), HeartbeatAck).job_id == job.job_id
    error(cp.on_message(a, Heartbeat(job.job_id, 1), 1.0), ErrorCode.WRONG_MEMBER, "rank")
    error(cp.on_message(a, Heartbeat(job.job_id + 1, 0), 1.0), ErrorCode.WRONG_MEMBER, "job_id")
    error(cp.on_message(b"x", Heartbeat(job.job_id, 0), 1.0), ErrorCode.NOT_JOINED)


def test_peer_gone_aborts_job():
    cp = plane()
    job, (a, b) = running_job(cp)
    replies = cp.peer_gone(b)
    assert [who for who, _ in replies] == [a] and "disconnected" in replies[0][1].reason


def test_peer_gone_of_the_last_member_frees_the_name_at_once():
    cp = plane()
    job, (a, b) = running_job(cp)
    cp.on_message(a, Leave(job.job_id, 0), 1.0)
    assert cp.peer_gone(b) == []              # nobody left to tell
    assert not cp.jobs and not cp.by_name and cp.pool.free == cp.pool.total
    assert only(join(cp, b"next", now=1.1), JoinOk).job_id != job.job_id


# ------------------------------------------------------------------------------------------ LEAVE


def test_leave_graceful_keeps_serving_others_until_all_left():
    cp = plane()
    job, (a, b) = running_job(cp)
    assert cp.on_message(a, Leave(job.job_id, 0), 1.0) == []
    assert job.state is JobState.RUNNING and [m.rank for m in job.receivers()] == [1]
    assert cp.admit_data(b, 1.0).job is job
    assert only(cp.admit_data(a, 1.0).replies, Error).code == ErrorCode.DEPARTED
    assert only(cp.on_message(b, Heartbeat(job.job_id, 1), 1.0), HeartbeatAck)


def test_leave_all_left_job_done_and_freed():
    cp = plane()
    job, (a, b) = running_job(cp)
    cp.on_message(a, Leave(job.job_id, 0), 1.0)
    reply = only(cp.on_message(b, Query(job.job_id, [3], [1]), 1.0), QueryReply)
    assert reply.departed == [0] and reply.missing == [[0, 1]]
    assert cp.check_liveness(2.0) == []        # the departed rank is not expected to speak
    cp.on_message(b, Leave(job.job_id, 1), 2.0)
    assert job.state is JobState.DONE and not cp.jobs and cp.pool.free == cp.pool.total
    assert cp.counters["jobs_done"] == 1


def test_leave_before_ready_frees_the_rank():
    cp = plane()
    join(cp, b"a", n=3)
    join(cp, b"b", n=3)
    cp.on_message(b"a", Leave(cp.by_name["j"].job_id, 0), 1.0)
    assert only(join(cp, b"c", n=3), JoinOk).rank == 0


def test_leave_with_reason_aborts_everyone_else():
    cp = plane()
    job, ids = running_job(cp, n=3)
    replies = cp.on_message(ids[1], Leave(job.job_id, 1, "CUDA out of memory"), 1.0)
    assert sorted(who for who, _ in replies) == [ids[0], ids[2]]
    assert all(m.rank == 1 and "CUDA out of memory" in m.reason for _, m in replies)
    assert job.state is JobState.ABORTED


# ------------------------------------------------------------------------------------------ misc


def test_query_reports_missing_ranks_from_dataplane():
    cp = plane()
    job, (a, b) = running_job(cp)
    burst = make_burst(Kind.DATA, job.job_id, 0, np.array([5]), np.array([0]), np.array([5]),
                       np.ones((1, 8), np.int32))
    job.dataplane.receive(burst, 0)
    reply = only(cp.on_message(b, Query(job.job_id, [5, 6], [0, 0]), 1.0), QueryReply)
    assert reply.missing == [[1], [0, 1]] and reply.departed == []
    error(cp.on_message(b, Query(job.job_id, [16], [0]), 1.0), ErrorCode.MALFORMED, "slots")


def test_stats_switch_wide_and_per_job():
    cp = ControlPlane(1024, 0.5, 3.0, GoldenDataplane, policy=Policy(token="op"))
    job, (a, _) = running_job(cp, token="op")
    stats = only(cp.on_message(b"monitor", StatsRequest(token="op"), 0.0), StatsReply).stats
    assert stats["jobs_active"] == 1 and stats["slots_free"] == 1024 - 16
    entry = stats["jobs"][str(job.job_id)]
    assert entry["state"] == "RUNNING" and entry["completions"] == 0 and entry["packets_in"] == 0
    json.dumps(stats)
    error(cp.on_message(b"monitor", StatsRequest(job.job_id + 7, "op"), 0.0), ErrorCode.UNKNOWN_JOB)


def test_stats_details_only_for_members_and_operators():
    cp = plane()
    job, (a, _) = running_job(cp)
    other, (c, _) = running_job(cp, job="other")
    # A stranger gets the switch-wide counters, no job; naming one is refused.
    stranger = only(cp.on_message(b"x", StatsRequest(), 0.0), StatsReply).stats
    assert stranger["jobs"] == {} and stranger["jobs_active"] == 2
    error(cp.on_message(b"x", StatsRequest(job.job_id), 0.0), ErrorCode.FORBIDDEN, "job_id")
    # A member sees its own job only, whatever it asks.
    mine = only(cp.on_message(a, StatsRequest(), 0.0), StatsReply).stats
    assert list(mine["jobs"]) == [str(job.job_id)]
    error(cp.on_message(a, StatsRequest(other.job_id), 0.0), ErrorCode.FORBIDDEN)
    # A tokenless switch has no operator: a token in STATS opens nothing.
    assert only(cp.on_message(b"x", StatsRequest(token="guess"), 0.0), StatsReply).stats["jobs"] == {}
    # The summary is small whatever the number of jobs.
    for i in range(200):
        join(cp, f"s{i}".encode(), job=f"s{i}", n=2, slots=1)
    summary = only(cp.on_message(b"x", StatsRequest(summary=True), 0.0), StatsReply)
    assert summary.stats["jobs_active"] == 202 and len(encode_control(summary)) < 2048


@pytest.mark.parametrize("frame", [b"\xff\x00garbage", b"[]", b'{"type":"NOPE"}',
                                   b'{"type":"HEARTBEAT"}', b"x" * 70000])
def test_malformed_control_answered_with_error_and_counted(frame):
    cp = plane()
    err = error(cp.on_control(b"a", frame, 0.0), ErrorCode.MALFORMED)
    assert err.field is not None
    assert sum(cp.counters["malformed"].values()) == 1
    encode_control(err)  # the reply itself is always encodable


def test_unexpected_message_type_refused():
    cp = plane()
    error(cp.on_message(b"a", Ready(3), 0.0), ErrorCode.UNEXPECTED, "type")


def test_shutdown_aborts_every_job():
    cp = plane()
    running_job(cp, job="x")
    running_job(cp, job="y")
    replies = cp.shutdown()
    assert len(replies) == 4 and all(m.reason == "switch shutting down" for _, m in replies)
    assert not cp.jobs and cp.pool.free == cp.pool.total


# ------------------------------------------------------------------------------------------ lifecycle


def test_lifecycle_legal_path_and_final_states():
    cp = plane()
    job, _ = running_job(cp)
    assert job.state is JobState.RUNNING
    assert TRANSITIONS[JobState.DONE] == {} and TRANSITIONS[JobState.ABORTED] == {}


@pytest.mark.parametrize("state,event", [(JobState.RUNNING, JobEvent.JOIN),
                                         (JobState.RUNNING, JobEvent.ALL_JOINED),
                                         (JobState.DONE, JobEvent.ABORT),
                                         (JobState.ABORTED, JobEvent.LEAVE)])
def test_lifecycle_illegal_event_raises_typed_error(state, event):
    cp = plane()
    join(cp, b"a")
    job = cp.by_name["j"]
    job.state = state
    with pytest.raises(LifecycleError) as info:
        job.transition(event)
    err = info.value
    assert (err.event, err.state, err.job) == (event, state, "j")
    assert event.value in str(err) and state.value in str(err) and "'j'" in str(err)
    assert job.state is state


# ------------------------------------------------------------------------------------------ pool


def test_several_jobs_get_disjoint_slot_partitions():
    cp = plane(total_slots=100)
    for i, slots in enumerate([30, 20, 40]):
        join(cp, f"a{i}".encode(), job=f"job{i}", slots=slots)
    ranges = sorted((j.slot_base, j.slot_base + j.slots) for j in cp.jobs.values())
    assert all(end <= nxt for (_, end), (nxt, _) in zip(ranges, ranges[1:]))
    assert len({j.job_id for j in cp.jobs.values()}) == 3
    assert cp.pool.free == 10
    cp.on_message(b"a1", Leave(cp.by_name["job1"].job_id, 0, "bye"), 0.0)
    error(join(cp, b"n", job="new", slots=25), ErrorCode.POOL_EXHAUSTED)  # 20 + 10, not contiguous
    assert only(join(cp, b"n", job="new", slots=20), JoinOk)
    assert cp.by_name["new"].slot_base == 30           # first fit: job1's old range


def test_slot_pool_first_fit_and_merge():
    pool = SlotPool(10)
    assert [pool.allocate(3), pool.allocate(3), pool.allocate(3)] == [0, 3, 6]
    assert pool.allocate(2) is None and pool.free == 1
    pool.release(3, 3)
    pool.release(0, 3)
    assert pool.largest_free == 6 and pool.allocate(6) == 0
    pool.release(6, 3)
    pool.release(0, 6)
    assert pool.largest_free == 10


# ------------------------------------------------------------------------------------------ config


def test_config_validate_names_field_and_value():
    with pytest.raises(ConfigError) as info:
        SwitchConfig(drop_ingress=1.5)
    assert info.value.field == "drop_ingress" and info.value.value == 1.5
    with pytest.raises(ConfigError, match="heartbeat_interval"):
        SwitchConfig(heartbeat_interval=5.0, liveness_timeout=3.0)
    with pytest.raises(ConfigError, match="bind"):
        SwitchConfig(bind="udp://x")
    assert "Default: 3.0" in SwitchConfig.describe("liveness_timeout")
