"""Is the switch there? A bounded wait for a switch to answer, before a worker starts any work.

What it owns: turning "no switch at that address" into one clear error within seconds, naming the
address and what to check, instead of a join that waits out its whole timeout in silence. What it
must never do: join a job or send data (it asks the switch for its counters only), or wait past
its deadline.

How it works: the switch's own health probe (`switch-emulator --probe`: STATS from a fresh DEALER
socket), repeated in 1 s tries until the deadline, so a switch that is still starting (compose
starts the containers together) is waited for; a line is logged once when the first try fails.
"""

from __future__ import annotations

import logging
import time

from switchagg.errors import SwitchTimeout

__all__ = ["SwitchUnreachable", "wait_for_switch"]

log = logging.getLogger("switchagg.probe")


class SwitchUnreachable(SwitchTimeout):
    """No switch answered at the address within the wait (the message says what to check)."""


def wait_for_switch(address: str, timeout: float = 10.0) -> float:
    """Wait until the switch at `address` answers a probe; returns the seconds it took.

    Raises:
        SwitchUnreachable: no answer within `timeout` seconds, or the address is malformed.
    """
    import zmq

    from switch_emulator.probe import probe
    from switchagg.errors import ProtocolError

    started = time.monotonic()
    deadline = started + timeout
    warned = False
    while True:
        left = deadline - time.monotonic()
        try:
            probe(address, timeout=max(0.05, min(1.0, left)))
            return time.monotonic() - started
        except zmq.ZMQError as exc:
            raise SwitchUnreachable(f"the switch address {address!r} is not usable ({exc}); "
                                    "expected tcp://HOST:PORT") from None
        except ProtocolError as exc:
            raise SwitchUnreachable(f"something at {address} answered, but not a switch of this "
                                    f"version: {exc}") from None
        except SwitchTimeout:
            if time.monotonic() >= deadline:
                break
            if not warned:
                log.info("waiting up to %.0f s for the switch at %s", timeout, address)
                warned = True
    raise SwitchUnreachable(
        f"no switch answered at {address} within {timeout:g} s. Check that switch-emulator runs "
        f"there (switch-emulator --bind tcp://0.0.0.0:PORT on that host), that the host name and "
        f"port are right, and that no firewall blocks the port; --connect-timeout waits longer")
