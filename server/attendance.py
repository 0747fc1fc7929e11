"""Waiting on the clients' presence: enough of them live before a round, and every live
one told the run is done after the last."""

from __future__ import annotations

import logging

from fedstream.server.admission.door import Admission
from fedstream.server.clock import Changes, Clock

log = logging.getLogger(__name__)


async def until_enough_live(admission: Admission, changes: Changes, min_clients: int) -> None:
    """Until at least `min_clients` clients are live, saying how many are as it changes."""
    announced = -1
    while True:
        live = len(admission.live())
        if live >= min_clients:
            return
        if live != announced:
            log.info("waiting for clients: %d of %d joined", live, min_clients)
            announced = live
        await changes.wait(1.0)


async def until_told_done(
    admission: Admission, changes: Changes, clock: Clock, min_clients: int, grace: float
) -> None:
    """Give every live client, and at least `min_clients` of them, up to `grace` seconds to
    hear the run is done (a coordinator restarted on a finished run waits for its clients
    to come back and hear it)."""
    deadline = clock.now() + grace
    while clock.now() < deadline:
        live = admission.live()
        told = sum(r.told_done for r in live)
        if told == len(live) and told >= min_clients:
            return
        await changes.wait(deadline - clock.now())
