"""`switch-emulator --pipes P`: P dataplane processes, each owning a disjoint range of every job's slots.

What it owns: starting, feeding and stopping the pipe processes (`PipeSet`, in the switch's main
process) and the loop each of them runs (`run_pipe`). A Tofino has several pipes, each with its own
ports and its own register memory; here each pipe is a process with its own ROUTER socket and its
own dataplane per job, so P pipes use P cores. Pipe p owns slots `packet.pipe_bounds(s, P)[p:p+2]`
of every job (s = the job's slots); a worker sends each burst to the pipe of its slots (its bursts
never straddle a range), so every slot lives in exactly one pipe and the golden model's rules hold
per slot unchanged (each pipe runs the same `FastDataplane`).

What it must never do: decide anything about jobs. The control plane stays one, in the main
process: one JOIN, one liveness, one abort for the whole job (`_jobs.ControlPlane` unchanged). The
main process tells the pipes what it decided: `member` (a worker joined: job, geometry (world
size, k, slots, lane width), rank and the key the worker greets the pipe with), `drop` (the job is over), `stop`.

How it works:
  main process                          pipe p (one process each)
    JOIN -> ControlPlane -> JOIN_OK   --member(job, rank, key)-->  remembers the member
    JOIN_OK + pipes + pipe_key -> worker
    worker --PIPE_HELLO(job, rank, key)-------------------------->  binds that connection to rank
           <-PIPE_HELLO_OK----------------------------------------
    worker --[D, header words, payloads] of slots in p's range--->  receive_split_checked
           <-[D, header words, payloads] results (multicast to the job's members on this pipe)
    ABORT / job gone              --drop(job)-->                   forgets the job
The control channel is one PAIR socket per pipe over ipc in a private folder. Each pipe binds its
data socket on the switch's host with a free port (tcp) or beside the switch's path (ipc), and
reports the bound endpoint before the switch serves anything. A pipe accepts only split data from
a connection that greeted it with the right key, drops packets outside its range (counted as
bad_slot, like any slot the job does not have), and sends what the dataplane returns, as the
main loop does. A data packet to the main socket is still served there (a pipe of its own, for
any slot): a worker that ignores the pipes still gets exact sums.
Liveness needs nothing from the pipes: workers heartbeat the main socket whatever they send.
Each pipe runs the call check (`_callseq`) on its slots; a mispaired call is reported to the main
process on the control channel (`mispaired`), which aborts the job as it does for its own socket
(within its liveness tick, 0.1 s), and the pipe drops the job's data meanwhile.
What a pipe queues for a worker is bounded in bytes as on the main socket (`_peerqueue`, the
same --peer-queue-bytes): past it results are dropped (counted results_refused; the worker
recovers them by retransmission), and a worker over it for the liveness timeout is reported
(`not_reading`) and its job aborted by the main process with that reason, while other jobs go on.
A message a pipe cannot use (ungreeted, wrong frames, oversized, truncated, another job's or
rank's packets, slots out of its range) is dropped and counted, never a crash. Security: with
--curve-secret-file each pipe's socket is a CURVE server with the switch's key pair; --token
guards JOIN, the only way to learn a pipe key (8 random bytes per worker, compared in constant
time), so a pipe admits only workers the main socket admitted.
Limits: no loss injection in pipes (the config refuses it); the main process's STATS counts
control traffic only, and each pipe logs its data counters when it stops.
"""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing as mp
import secrets
import shutil
import signal
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import zmq

from switch_emulator._callseq import CallCheck
from switch_emulator._peerqueue import DEFAULT_BUDGET, PeerQueues
from switchagg.packet import MAX_BURST_BYTES, SLOT_MASK, packet_bytes, parse_split, pipe_bounds
from switchagg.protocol import (FRAME_CONTROL, FRAME_DATA, Error, PipeHello, PipeHelloOk,
                                decode_control, encode_control)
from switchagg.errors import ProtocolError

__all__ = ["PipeSet", "run_pipe", "pipe_bind"]

log = logging.getLogger("switch_emulator.pipes")

#: Seconds the main process waits for every pipe to load its compiled pass and bind.
START_TIMEOUT = 60.0
#: Seconds a pipe gets to stop after `stop` before it is terminated.
STOP_TIMEOUT = 5.0
POLL_MS = 100
MAX_BATCH = 256
#: Greetings kept while their `member` is on its way (a worker's PIPE_HELLO can overtake it by a
#: poll or two); past this many the oldest is forgotten, so greetings from ever-new identities
#: (a rogue's) cannot grow a pipe's memory. A worker whose greeting was forgotten times out in
#: `PipeLinks.wait_ready` with a message naming the pipe.
MAX_WAITING = 256
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


def pipe_bind(bind: str, index: int) -> str:
    """Where pipe `index` binds, given the switch's own endpoint: a free port on the same host
    (tcp), or the switch's path with a suffix (ipc)."""
    if bind.startswith("tcp://"):
        return bind.rsplit(":", 1)[0] + ":0"
    return f"{bind}-pipe{index}"


class PipeSet:
    """The main process's side: P pipe processes, their endpoints, and what they are told.

    Args:
        pipes: P (>= 2).
        bind: the switch's endpoint (each pipe binds beside it, see `pipe_bind`).
        hwm: the pipes' high-water marks (SwitchConfig.hwm).
        context: the ZeroMQ context for the control sockets.
        budget: bytes of results a pipe may hold queued for one worker (`_peerqueue`).
        liveness_timeout: seconds a worker may stay over that budget before its pipe reports
            it (`not_reading`) and the main process aborts its job.
        curve_secret_file: the switch's CURVE secret key: the pipes' sockets are CURVE servers
            with it too ("" for plain sockets).

    Raises:
        RuntimeError: a pipe did not start, or could not bind, within START_TIMEOUT.
    """

    def __init__(self, pipes: int, bind: str, hwm: int, context: zmq.Context,
                 budget: int = DEFAULT_BUDGET, liveness_timeout: float = 3.0,
                 curve_secret_file: str = "") -> None:
        self.count = pipes
        self._folder = tempfile.mkdtemp(prefix="switchagg-pipes-")
        self._keys: dict[tuple[int, int], str] = {}
        self._jobs: set[int] = set()
        self._controls: list[zmq.Socket] = []
        self._procs: list[mp.Process] = []
        self.endpoints: list[str] = []
        ctx = mp.get_context("spawn")
        try:
            for p in range(pipes):
                control = context.socket(zmq.PAIR)
                control.setsockopt(zmq.LINGER, 500)
                address = f"ipc://{self._folder}/control-{p}"
                control.bind(address)
                self._controls.append(control)
                proc = ctx.Process(target=run_pipe, name=f"switch-pipe-{p}", daemon=True,
                                   args=(p, pipes, pipe_bind(bind, p), address, hwm,
                                         logging.getLogger().level, budget,
                                         liveness_timeout, curve_secret_file))
                proc.start()
                self._procs.append(proc)
            deadline = time.monotonic() + START_TIMEOUT
            for p, control in enumerate(self._controls):
                left = deadline - time.monotonic()
                if left <= 0 or not control.poll(int(left * 1000)):
                    raise RuntimeError(f"dataplane pipe {p} did not start within "
                                       f"{START_TIMEOUT:.0f}s")
                hello = json.loads(control.recv())
                if "error" in hello:
                    raise RuntimeError(f"dataplane pipe {p}: {hello['error']}")
                self.endpoints.append(hello["endpoint"])
        except BaseException:
            self.close()
            raise
        log.info("%d dataplane pipes on %s", pipes, ", ".join(self.endpoints))

    def _tell(self, message: dict) -> None:
        body = json.dumps(message).encode()
        for control in self._controls:
            control.send(body)

    def admit(self, job_id: int, rank: int, world_size: int, k: int, slots: int,
              lane_bits: int = 32) -> str:
        """A worker joined: tell every pipe; returns the key it greets them with."""
        key = self._keys.get((job_id, rank))
        if key is None:
            key = self._keys[(job_id, rank)] = secrets.token_hex(8)
        self._jobs.add(job_id)
        self._tell({"op": "member", "job_id": job_id, "rank": rank, "world_size": world_size,
                    "k": k, "slots": slots, "lane_bits": lane_bits, "key": key})
        return key

    def drop(self, job_id: int) -> None:
        """The job is over (aborted or done): every pipe forgets it."""
        if job_id in self._jobs:
            self._jobs.discard(job_id)
            self._keys = {jr: key for jr, key in self._keys.items() if jr[0] != job_id}
            self._tell({"op": "drop", "job_id": job_id})

    def reports(self) -> list[dict]:
        """What the pipes reported since the last call (without waiting): `mispaired` messages
        (a job whose calls drifted apart on a pipe: `_callseq.Mispaired`'s fields) and
        `not_reading` ones (job_id, rank, seconds over budget, bytes queued, budget)."""
        found = []
        for control in self._controls:
            for _ in range(64):
                try:
                    body = control.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    message = json.loads(body)
                except ValueError:
                    continue
                if isinstance(message, dict) and message.get("op") in ("mispaired",
                                                                        "not_reading"):
                    found.append(message)
        return found

    def sync(self, live_jobs) -> None:
        """Drop the jobs the control plane no longer has."""
        for job_id in [j for j in self._jobs if j not in live_jobs]:
            self.drop(job_id)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def close(self) -> None:
        """Stop every pipe (terminate what does not stop), close the channels, remove the folder."""
        for control in self._controls:
            try:
                control.send(b'{"op": "stop"}', zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(STOP_TIMEOUT)
        for control in self._controls:
            control.close(linger=0)
        self._procs, self._controls = [], []
        shutil.rmtree(self._folder, ignore_errors=True)


# ---- the pipe process ------------------------------------------------------------------------

@dataclass
class _PipeJob:
    job_id: int
    dataplane: object
    lo: int
    hi: int
    k: int
    slots: int
    lane_bits: int = 32                                        # the job's lane width
    calls: CallCheck | None = None                             # the job's call check here
    failed: bool = False              # mispaired or not reading: reported, data dropped
    keys: dict[int, str] = field(default_factory=dict)         # rank -> key
    members: dict[int, bytes] = field(default_factory=dict)    # rank -> identity on this pipe
    counters: dict[str, int] = field(default_factory=dict)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n


class _Pipe:
    """One pipe's state and loop (runs in its own process; see the module essay)."""

    def __init__(self, index: int, count: int, sock: zmq.Socket, control: zmq.Socket,
                 budget: int = DEFAULT_BUDGET, liveness_timeout: float = 3.0) -> None:
        from switch_emulator.dataplane import make_dataplane

        self.index, self.count = index, count
        self.sock, self.control = sock, control
        self.make_dataplane = make_dataplane
        self.jobs: dict[int, _PipeJob] = {}
        self.peers: dict[bytes, tuple[int, int]] = {}   # identity -> (job_id, rank)
        self.waiting: OrderedDict[bytes, PipeHello] = OrderedDict()  # ahead of their `member`
        self.queues = PeerQueues(budget)                # results queued per identity, in bytes
        self.liveness_timeout = liveness_timeout

    def on_control(self, message: dict) -> bool:
        """One message from the main process; False on `stop`."""
        op = message.get("op")
        if op == "stop":
            return False
        if op == "member":
            job_id = message["job_id"]
            job = self.jobs.get(job_id)
            if job is None:
                slots = message["slots"]
                lo, hi = pipe_bounds(slots, self.count)[self.index:self.index + 2]
                lane_bits = message.get("lane_bits", 32)
                job = self.jobs[job_id] = _PipeJob(
                    job_id, self.make_dataplane("fast", message["world_size"], slots, message["k"],
                                                lane_bits=lane_bits),
                    int(lo), int(hi), message["k"], slots, lane_bits, CallCheck(slots))
            job.keys[message["rank"]] = message["key"]
            for identity, hello in list(self.waiting.items()):
                if hello.job_id == job_id and hello.rank == message["rank"]:
                    del self.waiting[identity]
                    self.greet(identity, hello)
        elif op == "drop":
            job = self.jobs.pop(message["job_id"], None)
            if job is not None:
                log.info("pipe %d: job %d counters %s", self.index, message["job_id"],
                         json.dumps(job.counters, sort_keys=True))
                self.peers = {i: jr for i, jr in self.peers.items() if jr[0] != message["job_id"]}
                for identity in job.members.values():
                    self.queues.forget(identity)
        return True

    def greet(self, identity: bytes, hello: PipeHello) -> None:
        job = self.jobs.get(hello.job_id)
        if job is None or hello.rank not in job.keys:
            self.waiting[identity] = hello  # its `member` is on the way
            self.waiting.move_to_end(identity)
            while len(self.waiting) > MAX_WAITING:
                self.waiting.popitem(last=False)
            return
        if not secrets.compare_digest(job.keys[hello.rank], hello.key):
            self.reply(identity, Error("rejected", f"pipe {self.index}: wrong key for rank "
                                       f"{hello.rank} of job {hello.job_id}", "key"))
            return
        job.members[hello.rank] = identity
        self.peers[identity] = (hello.job_id, hello.rank)
        self.reply(identity, PipeHelloOk(hello.job_id, hello.rank))

    def reply(self, identity: bytes, message) -> None:
        try:
            self.sock.send_multipart([identity, FRAME_CONTROL, encode_control(message)], _NOBLOCK)
        except zmq.ZMQError:
            pass

    def on_message(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        if len(frames) == 3 and frames[1].bytes == FRAME_CONTROL:
            try:
                message = decode_control(frames[2].buffer)
            except ProtocolError as exc:
                self.reply(identity, Error("malformed", str(exc), exc.field))
                return
            if isinstance(message, PipeHello):
                self.greet(identity, message)
            return
        found = self.peers.get(identity)
        job = self.jobs.get(found[0]) if found else None
        if job is None:
            return  # not greeted (or its job is over): dropped, as the main socket would
        if len(frames) != 4 or frames[1].bytes != FRAME_DATA:
            job.count("malformed_frames")
            return
        hb, vb = frames[2].buffer, frames[3].buffer
        # As on the main socket: never more than the job's slots, whatever the layout.
        if hb.nbytes + vb.nbytes > min(MAX_BURST_BYTES,
                                       job.slots * packet_bytes(job.k, job.lane_bits)):
            job.count("oversized")
            return
        heads, vals, bad = parse_split(hb, vb, job.k, job.lane_bits)
        if bad:
            job.count(bad)
            return
        slot = heads[:, 2] & SLOT_MASK
        outside = (slot < job.lo) | (slot >= job.hi)
        if outside.any():  # another pipe's slots: dropped and counted like a slot out of range
            job.count("bad_slot", int(np.count_nonzero(outside)))
            heads, vals = heads[~outside], vals[~outside]
        job.count("packets_in", len(heads))
        if job.failed:  # its calls are mispaired: the main process is aborting it
            return
        mispaired = job.calls.check_split(heads, found[0], found[1])
        if mispaired is not None:  # the main process aborts the job, naming both calls
            job.failed = True
            job.count("mispaired")
            self.report({"op": "mispaired", "job_id": found[0], **mispaired._asdict()})
            return
        out, bad = job.dataplane.receive_split_checked(heads, vals, found[1], found[0])
        for reason, n in bad.items():
            job.count(reason, n)
        if len(out.mc_heads):  # one pair of tracked zero-copy frames for every member
            frames_out = (zmq.Frame(out.mc_heads, copy=False, track=True),
                          zmq.Frame(out.mc_vals, copy=False, track=True))
            for rank_out, identity_out in list(job.members.items()):
                self.send_data(job, rank_out, identity_out, frames_out)
        if len(out.uc_heads):
            self.send_data(job, found[1], identity,
                           (zmq.Frame(out.uc_heads, copy=False, track=True),
                            zmq.Frame(out.uc_vals, copy=False, track=True)))

    def send_data(self, job: _PipeJob, rank: int, identity: bytes,
                  frames: tuple[zmq.Frame, zmq.Frame]) -> None:
        """Send within the member's byte budget (`_peerqueue`, as the main socket does); a
        member over it for the liveness timeout does not read: reported to the main process,
        which aborts the job, and the job's data is dropped here meanwhile."""
        nbytes = len(frames[0].buffer) + len(frames[1].buffer)
        now = time.monotonic()
        if not self.queues.admit(identity, nbytes, now):
            job.count("results_refused")
            since = self.queues.over_since(identity)
            if since is not None and now - since > self.liveness_timeout and not job.failed:
                job.failed = True
                self.report({"op": "not_reading", "job_id": job.job_id, "rank": rank,
                             "seconds": round(now - since, 1),
                             "queued": self.queues.queued(identity),
                             "budget": self.queues.budget})
            return
        try:
            self.sock.send(identity, _NOBLOCK_MORE)
            self.sock.send(FRAME_DATA, _NOBLOCK_MORE)
            self.sock.send(frames[0], _NOBLOCK_MORE, copy=False)
            self.sock.send(frames[1], _NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # gone or full: the control plane's liveness decides
            job.count("send_failures")
            if exc.errno == errno.EHOSTUNREACH:
                self.peers.pop(identity, None)
                self.queues.forget(identity)
            return
        for frame in frames:
            self.queues.sent(identity, frame.tracker, len(frame.buffer))

    def report(self, message: dict) -> None:
        """Tell the main process (never blocks: a full channel loses the report, and the
        job's liveness still ends it)."""
        try:
            self.control.send(json.dumps(message).encode(), _NOBLOCK)
        except zmq.ZMQError:
            pass

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        while True:
            events = dict(poller.poll(POLL_MS))
            if self.control in events:
                while self.control.poll(0):
                    if not self.on_control(json.loads(self.control.recv())):
                        return
            if self.sock in events:
                for _ in range(MAX_BATCH):
                    try:
                        frames = self.sock.recv_multipart(_NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.on_message(frames)


def run_pipe(index: int, count: int, bind: str, control_address: str, hwm: int,
             log_level: int = logging.WARNING, budget: int = DEFAULT_BUDGET,
             liveness_timeout: float = 3.0, curve_secret_file: str = "") -> None:
    """Body of pipe process `index` of `count`: bind, report the endpoint, serve until `stop`."""
    # Ctrl-C at a terminal reaches the whole process group: the main process stops the pipes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from switch_emulator._alloc import start_trimming
    from switch_emulator.dataplane import warm_up

    start_trimming()  # as the main process does (switch_emulator/_alloc.py)
    ctx = zmq.Context()
    control = ctx.socket(zmq.PAIR)
    control.connect(control_address)
    sock = ctx.socket(zmq.ROUTER)
    for option, value in ((zmq.SNDHWM, hwm), (zmq.RCVHWM, hwm), (zmq.ROUTER_MANDATORY, 1),
                          (zmq.LINGER, 500), (zmq.MAXMSGSIZE, MAX_BURST_BYTES)):
        sock.setsockopt(option, value)
    try:
        if curve_secret_file:  # the switch's own key pair: workers reach pipes as the switch
            from switch_emulator._keys import server_options
            server_options(sock, curve_secret_file)
        warm_up("fast")  # before binding: no worker waits on a compile
        sock.bind(bind)
        control.send(json.dumps({"endpoint": sock.getsockopt_string(zmq.LAST_ENDPOINT)}).encode())
        _Pipe(index, count, sock, control, budget, liveness_timeout).run()
    except zmq.ZMQError as exc:
        control.send(json.dumps({"error": f"cannot bind {bind}: {exc}"}).encode())
    except (ValueError, RuntimeError) as exc:  # an unusable CURVE key file
        control.send(json.dumps({"error": str(exc)}).encode())
    finally:
        sock.close(linger=500)
        control.close(linger=0)
        ctx.term()
