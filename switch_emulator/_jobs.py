"""The switch's control plane: jobs, ranks, slot partitions, liveness and each job's lifecycle.

What it owns: which connection (ZeroMQ identity) is which rank of which job; admitting JOINs; each
job's partition of the switch-wide slot pool; job ids; who is alive; when a job is RUNNING, DONE or
ABORTED; the counters behind STATS. What it must never do: touch a socket, read a clock or
sleep. Like h11's `Connection`, messages and the time (`now`, in seconds) go in, and what comes back
is a list of `(identity, ControlMessage)` replies for the caller to send, so every rule below is
tested without ZeroMQ.

Rules (the contract with `switchagg.client`):
  JOIN   With a switch token (`Policy.token`) every JOIN must carry it (ERROR bad_token). The first
         JOIN for a job name creates the job, within the admission quotas (`_admission`: slots per
         job, slots and jobs per creating host; ERROR quota naming the limit): a u16 job id, and
         `slots` taken from the pool (ERROR pool_exhausted while it cannot hold them). The name is
         bound to the job until it ends. Later JOINs must agree on world_size, k,
         slots, lane_bits (ERROR mismatch, naming the field and both values; a JOIN that names
         no lane width takes the switch's default, `--lane-bits`) and token (ERROR bad_token, values
         not echoed). rank=None takes the lowest free rank; a taken rank is ERROR rank_taken, a full
         job ERROR job_full. The reply is JOIN_OK; when the last rank joins, every worker gets READY.
         The same connection repeating its JOIN (its JOIN_OK was lost) gets the same JOIN_OK again
         (and READY if the job runs); the same connection joining something else is ERROR
         already_joined (one connection, one job, one rank). A refusal by a live job of the
         same name (job_full, rank_taken, mismatch) says so: its state, workers, age and
         creating host, and what to do (another job name, or wait for it to end).
  DATA   is accepted only from a joined connection of a RUNNING job, as the rank it joined with.
         Otherwise the sender gets at most one refusal per `refusal_interval` (ERROR not_joined,
         not_ready or departed, or the job's ABORT again).
  GONE   A member whose connection closed without LEAVE (`peer_gone`: the front saw it
         disconnect, or a send found it gone) aborts its job at once, so a job never outlives
         its processes: its name and slots are free again within about a second of a crash.
  LIVENESS  Any message from a worker refreshes it. A worker (JOINING or RUNNING, not departed)
         silent for more than `liveness_timeout` aborts its job (the fallback for connections
         that die without closing: a half-open TCP connection); a job still JOINING
         `Policy.join_timeout` after its creation is aborted too (a squatter cannot hold a name).
  CALLS  Two ranks' contributions to one slot round from different calls (`_callseq`, checked by
         the front per burst) abort the job, naming both call numbers (`mispaired`).
  STATS  Switch-wide counters to anyone (`summary`: those alone); a job's details to its members,
         every job's to holders of the switch token.
  INCARNATION  A random id per ControlPlane, in JOIN_OK and HEARTBEAT_ACK: a worker that sees
         another one, or gets ERROR not_joined / wrong_member / departed, knows its job is gone.
  LEAVE  With an empty reason the worker is done: it gets no more results, the others keep being
         served (retransmissions included); when every rank has left, the job is DONE and freed.
         Before READY, a graceful LEAVE just frees the rank. With a reason, the job is aborted.
  ABORT  Every remaining worker gets ABORT(job_id, reason, rank-that-caused-it); the slots and job id
         return to the pool; later messages from the job's connections get ABORT again ("job
         aborted: ...; re-join").
  Malformed control (ProtocolError) is ERROR malformed naming the field, counted, never a crash.

Each job's lifecycle (JOINING -> RUNNING -> DONE / ABORTED, as data), members and counters live in
`_job.py`; this module drives them.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

from switch_emulator._admission import PeerQuotas, Policy, same_token
from switch_emulator._callseq import CallCheck, Mispaired
from switch_emulator._job import (TRANSITIONS, Dataplane, Job, JobCounters, JobEvent, JobState,
                                  LifecycleError, Member, SlotPool)
from switch_emulator._loss import LossInjector
from switchagg.errors import ProtocolError
from switchagg.packet import DEFAULT_LANE_BITS, check_lane_bits
from switchagg.protocol import (Abort, ControlMessage, Error, Heartbeat, HeartbeatAck, Join, JoinOk,
                                Leave, Query, QueryReply, Ready, StatsReply, StatsRequest,
                                MAX_NAME_LEN, MAX_TEXT_LEN, decode_control)

__all__ = ["JobState", "JobEvent", "TRANSITIONS", "LifecycleError", "ErrorCode", "SlotPool", "Member",
           "JobCounters", "Job", "ControlPlane", "Admission", "Reply", "Dataplane"]

log = logging.getLogger("switch_emulator.jobs")

#: What the control plane asks the caller to send: (peer identity, message).
Reply = tuple[bytes, ControlMessage]

#: Refusals of data (ERROR or a repeated ABORT) go to one peer at most this often, in seconds:
#: a worker streams thousands of bursts per second, and one answer is enough to stop it.
REFUSAL_INTERVAL_S = 1.0
#: Aborted connections remembered for "job aborted: ...; re-join" answers (oldest forgotten first).
MAX_TOMBSTONES = 4096
#: Peers remembered by the refusal rate limiter before it starts over.
MAX_RATE_LIMITED_PEERS = 65536


class ErrorCode:
    """Values of ERROR.code the switch sends (the client decides what to raise from them)."""

    MALFORMED = "malformed"            # the control message broke the protocol; `field` says where
    UNEXPECTED = "unexpected"          # a message only the switch sends (JOIN_OK, READY, ...)
    MISMATCH = "mismatch"              # JOIN disagrees with the job on world_size, k, slots, lanes
    BAD_TOKEN = "bad_token"            # JOIN's token differs from the job's
    RANK_TAKEN = "rank_taken"          # JOIN asked for a rank another connection holds
    JOB_FULL = "job_full"              # JOIN to a job whose ranks are all taken
    POOL_EXHAUSTED = "pool_exhausted"  # the switch's free slots cannot hold the new job
    NO_JOB_IDS = "no_job_ids"          # 65536 jobs at once
    ALREADY_JOINED = "already_joined"  # this connection is already a member of another job/rank
    NOT_JOINED = "not_joined"          # data or control from a connection that never joined
    WRONG_MEMBER = "wrong_member"      # job_id/rank differ from those this connection joined with
    NOT_READY = "not_ready"            # data before READY
    DEPARTED = "departed"              # data after this worker's graceful LEAVE
    UNKNOWN_JOB = "unknown_job"        # STATS for a job id that does not exist
    QUOTA = "quota"                    # JOIN beyond a limit of the switch's admission policy
    FORBIDDEN = "forbidden"            # STATS of a job by one who is neither member nor operator

    #: Codes that answer a JOIN: the worker was not admitted (switchagg raises JoinRejected).
    JOIN_REJECTIONS = frozenset({"mismatch", "bad_token", "rank_taken", "job_full",
                                 "pool_exhausted", "no_job_ids", "already_joined", "quota"})
    #: Codes that tell a joined worker the switch does not (or no longer) count it in its job:
    #: its pending calls can never complete (switchagg fails them at once).
    MEMBERSHIP_LOST = frozenset({"not_joined", "wrong_member", "departed"})


class Admission(NamedTuple):
    """Whether a data frame may enter the dataplane: `job` and `rank` if so, else `replies`."""

    job: Job | None
    rank: int
    replies: list[Reply]


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int)) or (isinstance(value, float)
                                                           and math.isfinite(value)):
        return value
    return repr(value)[:64] if not isinstance(value, str) else value[:64]


class ControlPlane:
    """Jobs and their members, driven by control messages and the time.

    Args:
        total_slots: the switch's slot pool, shared by every job.
        heartbeat_interval, liveness_timeout: seconds; told to workers in JOIN_OK, and the second
            one enforced by `check_liveness`.
        dataplane_factory: `(world_size, slots, k) -> dataplane` for each new job; called with
            `lane_bits=b` as a keyword too for jobs of 8 or 16-bit lanes (so a factory without it
            serves 32-bit lanes only).
        loss_factory: `job_id -> (ingress, egress)` loss injectors for a new job, or None (lossless).
        refusal_interval: seconds between two refusals of data sent to one peer.
        policy: admission limits (`_admission.Policy`; default: admit everything).
        incarnation: this run's id, sent in JOIN_OK and HEARTBEAT_ACK (default: random).
        lane_bits: the lane width of jobs whose JOIN names none (8, 16 or 32; default 32).
    """

    def __init__(self, total_slots: int, heartbeat_interval: float, liveness_timeout: float,
                 dataplane_factory: Callable[[int, int, int], Dataplane],
                 loss_factory: Callable[[int], tuple[LossInjector | None, LossInjector | None]]
                 | None = None, refusal_interval: float = REFUSAL_INTERVAL_S,
                 policy: Policy | None = None, incarnation: str | None = None,
                 lane_bits: int = DEFAULT_LANE_BITS) -> None:
        self.pool = SlotPool(total_slots)
        self.lane_bits = check_lane_bits(lane_bits)
        self.policy = policy or Policy()
        self.quotas = PeerQuotas(self.policy)
        # A worker that sees another incarnation knows the switch restarted and lost its job.
        self.incarnation = incarnation or os.urandom(8).hex()
        self.heartbeat_interval = heartbeat_interval
        self.liveness_timeout = liveness_timeout
        self.dataplane_factory = dataplane_factory
        self.loss_factory = loss_factory
        self.refusal_interval = refusal_interval
        self.jobs: dict[int, Job] = {}
        self.by_name: dict[str, Job] = {}
        self.members: dict[bytes, tuple[Job, Member]] = {}
        self.tombstones: OrderedDict[bytes, Abort] = OrderedDict()
        self._last_refusal: dict[bytes, float] = {}
        self._next_job_id = 0
        self.counters: dict[str, Any] = {
            "malformed": {}, "unknown_sender": 0, "control_errors": 0, "send_failures": 0,
            "peers_gone": 0, "joins": 0, "jobs_created": 0, "jobs_done": 0, "jobs_aborted": 0,
            "jobs_expired": 0, "mispaired": 0, "internal_errors": 0,
        }

    # ----------------------------------------------------------------------------- entry points

    def on_control(self, identity: bytes, frame: bytes | memoryview, now: float,
                   peer: str | None = None) -> list[Reply]:
        """Handle one control frame from `identity` (`peer`: its host, for quotas; default the
        identity itself).

        Returns:
            The replies to send. A malformed frame yields ERROR(malformed, field); never raises.
        """
        try:
            message = decode_control(frame)
        except ProtocolError as exc:
            self._touch(identity, now)
            self.count_malformed(f"control:{exc.field or 'body'}")
            return [self._error(identity, ErrorCode.MALFORMED, str(exc), exc.field, exc.value)]
        except Exception as exc:  # noqa: BLE001 - a gap in the checks: answer, count, go on
            log.exception("control message from %s broke the decoder", identity.hex())
            self.count_malformed("control:internal")
            return [self._error(identity, ErrorCode.MALFORMED,
                                f"control message could not be decoded ({type(exc).__name__})",
                                "body")]
        return self.on_message(identity, message, now, peer)

    def on_message(self, identity: bytes, message: ControlMessage, now: float,
                   peer: str | None = None) -> list[Reply]:
        """Handle one decoded control message from `identity` (see the module's rules)."""
        if isinstance(message, Join):
            return self._join(identity, message, now, peer or identity.hex())
        if isinstance(message, StatsRequest):
            self._touch(identity, now)
            return self._stats(identity, message)
        if isinstance(message, (Heartbeat, Leave, Query)):
            found = self._membership(identity, message.job_id, getattr(message, "rank", None), now,
                                     quiet_if_aborted=isinstance(message, Leave))
            if not isinstance(found, tuple):
                return found
            job, member = found
            if isinstance(message, Heartbeat):
                return [(identity, HeartbeatAck(job.job_id, self.incarnation))]
            if isinstance(message, Leave):
                return self._leave(job, member, message.reason)
            return self._query(identity, job, message)
        self._touch(identity, now)
        return [self._error(identity, ErrorCode.UNEXPECTED,
                            f"{message.TYPE} is sent by the switch, not to it", "type", message.TYPE)]

    def admit_data(self, identity: bytes, now: float) -> Admission:
        """Decide whether a data frame from `identity` enters the dataplane (and refresh liveness)."""
        found = self.members.get(identity)
        if found is not None:
            job, member = found
            member.last_seen = now
            if job.state is JobState.RUNNING and not member.departed:
                return Admission(job, member.rank, [])
            if member.departed:
                code, text = ErrorCode.DEPARTED, (f"rank {member.rank} left job {job.name!r}; its "
                                                  "data is dropped (JOIN again to rejoin a new job)")
            else:
                code, text = ErrorCode.NOT_READY, (f"job {job.name!r} has {len(job.members)} of "
                                                   f"{job.world_size} workers; wait for READY "
                                                   "before sending data")
            job.counters.count_malformed({code: 1})
            return Admission(None, member.rank, self._refuse(identity, now, code, text))
        tomb = self.tombstones.get(identity)
        if tomb is not None:
            self.count_malformed("data_after_abort")
            return Admission(None, -1, [(identity, tomb)] if self._may_refuse(identity, now) else [])
        self.counters["unknown_sender"] += 1
        return Admission(None, -1, self._refuse(
            identity, now, ErrorCode.NOT_JOINED,
            f"this connection is in no job of switch incarnation {self.incarnation}: send JOIN "
            "and wait for READY before data (a worker that had joined: the switch restarted and "
            "lost its job; restart the job)"))

    def check_liveness(self, now: float) -> list[Reply]:
        """Abort every job with a member silent for more than `liveness_timeout` seconds, and
        every job still short of ranks `policy.join_timeout` seconds after it was created."""
        replies: list[Reply] = []
        for job in list(self.jobs.values()):
            if (job.state is JobState.JOINING
                    and now - job.created_at > self.policy.join_timeout):
                self.counters["jobs_expired"] += 1
                replies += self.abort(job, f"job {job.name!r} had {len(job.members)} of "
                                           f"{job.world_size} workers {self.policy.join_timeout:g} s "
                                           "after its first JOIN (join timeout); start every "
                                           "worker, or check --world-size", None)
                continue
            for member in list(job.members.values()):
                silent = now - member.last_seen
                if not member.departed and silent > self.liveness_timeout:
                    replies += self.abort(job, f"rank {member.rank} of job {job.name!r} was silent "
                                               f"for {silent:.2f} s (liveness timeout "
                                               f"{self.liveness_timeout:g} s)", member.rank)
                    break
        return replies

    def peer_gone(self, identity: bytes) -> list[Reply]:
        """`identity`'s connection closed without LEAVE (the front found it gone: a send
        found no such peer, or ZeroMQ reported it disconnected and it did not come back). Abort
        its job for the others and free it."""
        found = self.members.get(identity)
        self.counters["peers_gone"] += 1
        if found is None or found[1].departed:
            return []
        job, member = found
        return self.abort(job, f"rank {member.rank} of job {job.name!r} disconnected without "
                               "LEAVE (its process died or closed its connection)", member.rank,
                          exclude=identity)

    def shutdown(self, reason: str = "switch shutting down") -> list[Reply]:
        """Abort every job (the switch is stopping); return the ABORTs to send."""
        replies: list[Reply] = []
        for job in list(self.jobs.values()):
            replies += self.abort(job, reason, None)
        return replies

    def abort(self, job: Job, reason: str, rank: int | None, exclude: bytes | None = None
              ) -> list[Reply]:
        """Abort `job` for every remaining worker (but `exclude`) and free its resources."""
        job.transition(JobEvent.ABORT)
        job.reason = reason
        log.warning("job %r (id %d) aborted: %s", job.name, job.job_id, reason)
        message = Abort(job.job_id, reason, rank)
        replies = [(m.identity, message) for m in job.receivers() if m.identity != exclude]
        later = Abort(job.job_id, f"job aborted: {reason}; re-join", rank)
        for member in job.members.values():
            self.tombstones[member.identity] = later
            self.tombstones.move_to_end(member.identity)
        while len(self.tombstones) > MAX_TOMBSTONES:
            self.tombstones.popitem(last=False)
        self.counters["jobs_aborted"] += 1
        self._release(job)
        return replies

    def mispaired(self, job: Job, found: Mispaired) -> list[Reply]:
        """Two ranks' calls met on one slot (`_callseq`): abort the job, naming both calls."""
        self.counters["mispaired"] += 1
        return self.abort(job, found.describe(job.name), found.rank)

    def count_malformed(self, reason: str, n: int = 1) -> None:
        """Count a message no job can be blamed for (bad frames, malformed control)."""
        malformed = self.counters["malformed"]
        malformed[reason] = malformed.get(reason, 0) + n

    def refuse(self, identity: bytes, now: float, code: str, text: str,
               field_name: str | None = None) -> list[Reply]:
        """An ERROR for `identity`, unless it got a refusal less than `refusal_interval` ago."""
        return self._refuse(identity, now, code, text, field_name)

    def stats(self, job_id: int | None = None, jobs: bool = True) -> dict[str, Any]:
        """Switch-wide counters at the top level, per-job ones under "jobs" (keyed by str(job_id)):
        every job's, or job `job_id`'s, or none (`jobs=False`: a summary, small whatever the
        number of jobs)."""
        out = {key: (dict(v) if isinstance(v, dict) else v) for key, v in self.counters.items()}
        out.update(jobs_active=len(self.jobs), slots_total=self.pool.total,
                   slots_free=self.pool.free, incarnation=self.incarnation,
                   jobs_joining=sum(j.state is JobState.JOINING for j in self.jobs.values()))
        chosen = [] if not jobs else self.jobs.values() if job_id is None else [self.jobs[job_id]]
        out["jobs"] = {str(job.job_id): job.stats() for job in chosen}
        return out

    # ----------------------------------------------------------------------------- JOIN

    def _join(self, identity: bytes, msg: Join, now: float, peer: str) -> list[Reply]:
        self.counters["joins"] += 1
        if self.policy.token and not same_token(msg.token, self.policy.token):
            return [self._error(identity, ErrorCode.BAD_TOKEN,
                                "this switch admits only JOINs that carry its token (--token); "
                                "pass the switch's token", "token")]
        self.tombstones.pop(identity, None)
        current = self.members.get(identity)
        if current is not None:
            job, member = current
            member.last_seen = now
            same = (job.name == msg.job and msg.rank in (None, member.rank)
                    and (msg.world_size, msg.k, msg.slots, self._lanes_of(msg))
                    == (job.world_size, job.k, job.slots, job.lane_bits)
                    and same_token(msg.token, job.token))
            if not same:
                return [self._error(identity, ErrorCode.ALREADY_JOINED,
                                    f"this connection already joined job {job.name!r} as rank "
                                    f"{member.rank}; use one connection per job and rank (or LEAVE "
                                    "first)", "job", msg.job)]
            # The JOIN_OK was lost (or the worker is impatient): the same answer again.
            replies = [(identity, self._join_ok(job, member.rank))]
            if job.state is JobState.RUNNING:
                replies.append((identity, Ready(job.job_id)))
            return replies

        job = self.by_name.get(msg.job)
        if job is None:
            created = self._create(identity, msg, now, peer)
            if not isinstance(created, Job):
                return created
            job = created
        else:
            for name in ("world_size", "k", "slots", "lane_bits"):
                ours = getattr(job, name)
                theirs = self._lanes_of(msg) if name == "lane_bits" else getattr(msg, name)
                if ours != theirs:
                    return [self._error(identity, ErrorCode.MISMATCH,
                                        f"JOIN.{name}={theirs} disagrees with job {msg.job!r}, "
                                        f"created with {name}={ours}; every worker of a job must "
                                        f"use the same {name} ({self._live(job, now)}: a new "
                                        "run needs another job name, or the old run's end)",
                                        name, theirs)]
            if not same_token(msg.token, job.token):
                return [self._error(identity, ErrorCode.BAD_TOKEN,
                                    f"JOIN.token does not match the token of job {msg.job!r}; "
                                    "use the job's token", "token")]
        if len(job.members) >= job.world_size:
            return [self._error(identity, ErrorCode.JOB_FULL,
                                f"{self._live(job, now)}; choose another job name (--job), or "
                                "wait for it to end (or stop its workers): a job ends as soon "
                                "as its last worker leaves, disconnects or dies", "job", msg.job)]
        rank = job.free_rank() if msg.rank is None else msg.rank
        if rank in job.members:
            return [self._error(identity, ErrorCode.RANK_TAKEN,
                                f"rank {rank} of job {job.name!r} is held by another connection "
                                f"({self._live(job, now)}); choose a free rank or omit rank",
                                "rank", rank)]
        member = Member(identity, rank, now)
        job.members[rank] = member
        job.membership_changed()
        self.members[identity] = (job, member)
        job.transition(JobEvent.JOIN)
        replies: list[Reply] = [(identity, self._join_ok(job, rank))]
        log.info("job %r (id %d): rank %d joined (%d of %d)", job.name, job.job_id, rank,
                 len(job.members), job.world_size)
        if len(job.members) == job.world_size:
            job.transition(JobEvent.ALL_JOINED)
            log.info("job %r (id %d) is running with %d workers", job.name, job.job_id,
                     job.world_size)
            ready = Ready(job.job_id)
            replies += [(m.identity, ready) for m in job.receivers()]
        return replies

    @staticmethod
    def _live(job: Job, now: float) -> str:
        """What a JOIN refused by a live job of the same name needs to know about that job."""
        state = "running" if job.state is JobState.RUNNING else "waiting for its workers"
        left = sorted(r for r, m in job.members.items() if m.departed)
        return (f"job {job.name!r} is still {state} with {len(job.members)}/{job.world_size} "
                f"workers" + (f", ranks {left} left" if left else "")
                + f" (created {max(now - job.created_at, 0.0):.0f} s ago from {job.creator})")

    def _create(self, identity: bytes, msg: Join, now: float, peer: str) -> Job | list[Reply]:
        refused = self.quotas.refusal(peer, msg.job, msg.slots)
        if refused is not None:
            return [self._error(identity, ErrorCode.QUOTA, refused[1], refused[0],
                                msg.slots if refused[0] == "slots" else msg.job)]
        job_id = self._allocate_job_id()
        if job_id is None:
            return [self._error(identity, ErrorCode.NO_JOB_IDS,
                                "the switch runs 65536 jobs already; wait for one to end", "job")]
        base = self.pool.allocate(msg.slots)
        if base is None:
            return [self._error(identity, ErrorCode.POOL_EXHAUSTED,
                                f"job {msg.job!r} asks for {msg.slots} slots but the switch has "
                                f"{self.pool.free} of {self.pool.total} free (largest free range "
                                f"{self.pool.largest_free}); ask for fewer slots, wait for a job to "
                                "end, or start the switch with a larger --slots", "slots",
                                msg.slots)]
        ingress, egress = self.loss_factory(job_id) if self.loss_factory else (None, None)
        lane_bits = self._lanes_of(msg)
        wide = {} if lane_bits == DEFAULT_LANE_BITS else {"lane_bits": lane_bits}
        job = Job(msg.job, job_id, msg.world_size, msg.k, msg.slots, msg.token, base,
                  self.dataplane_factory(msg.world_size, msg.slots, msg.k, **wide), ingress, egress,
                  now, lane_bits=lane_bits)
        job.creator = peer
        job.calls = CallCheck(msg.slots)
        self.quotas.charge(peer, msg.slots)
        self.jobs[job_id] = job
        self.by_name[msg.job] = job
        self.counters["jobs_created"] += 1
        log.info("job %r created: id %d, %d workers, k=%d, %d-bit lanes, slots [%d, %d)", msg.job,
                 job_id, msg.world_size, msg.k, lane_bits, base, base + msg.slots)
        return job

    def _lanes_of(self, msg: Join) -> int:
        """The lane width a JOIN asks for: its own, or this switch's default."""
        return self.lane_bits if msg.lane_bits is None else msg.lane_bits

    def _allocate_job_id(self) -> int | None:
        # Round robin, so a freed id is reused as late as possible (stale packets of an old job
        # are then rejected as bad_job rather than counted into a new one).
        for offset in range(1 << 16):
            job_id = (self._next_job_id + offset) & 0xFFFF
            if job_id not in self.jobs:
                self._next_job_id = (job_id + 1) & 0xFFFF
                return job_id
        return None

    def _join_ok(self, job: Job, rank: int) -> JoinOk:
        return JoinOk(job.name, job.job_id, rank, job.world_size, job.k, job.slots,
                      self.heartbeat_interval, self.liveness_timeout, self.incarnation,
                      lane_bits=job.lane_bits)

    # ----------------------------------------------------------------------------- LEAVE, QUERY, STATS

    def _leave(self, job: Job, member: Member, reason: str) -> list[Reply]:
        if reason:
            return self.abort(job, f"rank {member.rank} of job {job.name!r} left: {reason}",
                              member.rank, exclude=member.identity)
        if member.departed:
            return []  # a repeated LEAVE
        if job.state is JobState.JOINING:
            # Before READY no slot holds its data: the rank is simply free again.
            del job.members[member.rank]
            del self.members[member.identity]
        else:
            member.departed = True
        job.membership_changed()
        job.transition(JobEvent.LEAVE)
        log.info("job %r (id %d): rank %d left", job.name, job.job_id, member.rank)
        if all(m.departed for m in job.members.values()):
            job.transition(JobEvent.ALL_LEFT)
            self.counters["jobs_done"] += 1
            log.info("job %r (id %d) is done", job.name, job.job_id)
            self._release(job)
        return []

    def _query(self, identity: bytes, job: Job, msg: Query) -> list[Reply]:
        bad = [s for s in msg.slots if s >= job.slots]
        if bad:
            return [self._error(identity, ErrorCode.MALFORMED,
                                f"QUERY names slot {bad[0]}; job {job.name!r} has slots "
                                f"0..{job.slots - 1}", "slots", bad[0])]
        missing = [job.dataplane.missing_workers(v, s) for s, v in zip(msg.slots, msg.versions)]
        departed = sorted(r for r, m in job.members.items() if m.departed)
        return [(identity, QueryReply(job.job_id, missing, departed))]

    def _stats(self, identity: bytes, msg: StatsRequest) -> list[Reply]:
        """Operators (the switch's token) see every job; members their own; anyone the summary."""
        if msg.summary:
            return [(identity, StatsReply(self.stats(jobs=False)))]
        operator = bool(self.policy.token) and same_token(msg.token, self.policy.token)
        found = self.members.get(identity)
        own = found[0].job_id if found is not None else None
        if msg.job_id is not None and msg.job_id not in self.jobs:
            return [self._error(identity, ErrorCode.UNKNOWN_JOB,
                                f"no job has id {msg.job_id}; omit job_id for every job",
                                "job_id", msg.job_id)]
        if operator:
            return [(identity, StatsReply(self.stats(msg.job_id)))]
        if msg.job_id is not None and msg.job_id != own:
            return [self._error(identity, ErrorCode.FORBIDDEN,
                                f"job {msg.job_id}'s details go to its members and to holders "
                                "of the switch's token only", "job_id", msg.job_id)]
        return [(identity, StatsReply(self.stats(own, jobs=own is not None)))]

    # ----------------------------------------------------------------------------- helpers

    def _membership(self, identity: bytes, job_id: int, rank: int | None, now: float,
                    quiet_if_aborted: bool = False) -> tuple[Job, Member] | list[Reply]:
        found = self.members.get(identity)
        if found is not None:
            job, member = found
            member.last_seen = now
            if job_id != job.job_id or (rank is not None and rank != member.rank):
                return [self._error(identity, ErrorCode.WRONG_MEMBER,
                                    f"this connection joined job {job.name!r} (id {job.job_id}) as "
                                    f"rank {member.rank}, not job_id={job_id} rank={rank}",
                                    "job_id" if job_id != job.job_id else "rank",
                                    job_id if job_id != job.job_id else rank)]
            return job, member
        tomb = self.tombstones.get(identity)
        if tomb is not None:
            return [] if quiet_if_aborted else [(identity, tomb)]
        self.counters["unknown_sender"] += 1
        return [self._error(identity, ErrorCode.NOT_JOINED,
                            f"this connection is in no job of switch incarnation "
                            f"{self.incarnation}: send JOIN first (a worker that had joined: the "
                            "switch restarted and lost its job; restart the job)", "job_id",
                            job_id)]

    def _touch(self, identity: bytes, now: float) -> None:
        found = self.members.get(identity)
        if found is not None:
            found[1].last_seen = now

    def _release(self, job: Job) -> None:
        for member in job.members.values():
            self.members.pop(member.identity, None)
        if self.jobs.pop(job.job_id, None) is not None:
            self.quotas.refund(job.creator, job.slots)
        if self.by_name.get(job.name) is job:
            del self.by_name[job.name]
        self.pool.release(job.slot_base, job.slots)

    def _error(self, identity: bytes, code: str, text: str, field_name: str | None = None,
               value: Any = None) -> Reply:
        self.counters["control_errors"] += 1
        if len(text) > MAX_TEXT_LEN:  # it may quote a peer's bytes: keep the answer bounded
            text = text[:MAX_TEXT_LEN - 3] + "..."
        if field_name is not None:
            field_name = "".join(c if "!" <= c <= "~" else "?" for c in field_name[:MAX_NAME_LEN])
        return identity, Error(code, text, field_name, _json_safe(value))

    def _may_refuse(self, identity: bytes, now: float) -> bool:
        last = self._last_refusal.get(identity)
        if last is not None and now - last < self.refusal_interval:
            return False
        if len(self._last_refusal) >= MAX_RATE_LIMITED_PEERS:
            self._last_refusal.clear()
        self._last_refusal[identity] = now
        return True

    def _refuse(self, identity: bytes, now: float, code: str, text: str,
                field_name: str | None = None) -> list[Reply]:
        if not self._may_refuse(identity, now):
            return []
        return [self._error(identity, code, text, field_name)]
