"""Both ranks of a 2-worker switch job in one process, ended one of several ways (test_job_lifetime).

    python tests/lifetime_worker.py ADDRESS JOB MODE [WORLD]

Joins job JOB (of WORLD workers, default 2) at ADDRESS as rank 0 and rank 1, each from its own
thread since joining waits for READY (the test holds any other rank), prints "ready" once the job
runs, then ends by MODE:
  close  closes both clients (LEAVE) and exits 0;
  exit   exits 0 without closing them (the atexit handler must LEAVE);
  raise  ends on an uncaught RuntimeError (the atexit handler must LEAVE, naming it);
  state  rank 0's client belongs to a DDP `HookState` that is dropped unclosed and collected
         (its finalizer must LEAVE), rank 1 closes; prints "dropped", then sleeps while the
         process lives;
  hang   sleeps until killed (the test SIGKILLs it: no LEAVE at all).
"""

import gc
import sys
import threading
import time

from switchagg import ClientConfig, SwitchClient

CONFIG = ClientConfig(k=8, slots=16, burst=8, join_timeout=20, op_timeout=20)


def both(fn) -> list:
    """fn(rank) on each rank in its own thread; their results."""
    out: list = [None, None]
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, fn(r))) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(o is not None for o in out), "a rank failed (see above)"
    return out


def main() -> int:
    address, job, mode = sys.argv[1:4]
    world = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    state = None
    if mode == "state":  # torch's import is slow: only this mode pays it
        from switchagg.ddp import HookState
        state = HookState("intsgd-random", address, job=job, world_size=world, rank=0,
                          config=CONFIG)
    clients = both(lambda r: state.client if r == 0 and mode == "state"
                   else SwitchClient(address, job, world, r, config=CONFIG))
    print("ready", flush=True)
    if mode == "close":
        for c in clients:
            c.close()
    elif mode == "raise":
        raise RuntimeError("the training step failed")
    elif mode == "state":
        del state
        clients[0] = None
        gc.collect()
        clients[1].close()
        print("dropped", flush=True)
        time.sleep(60)
    elif mode == "hang":
        time.sleep(300)
    return 0


if __name__ == "__main__":
    sys.exit(main())
