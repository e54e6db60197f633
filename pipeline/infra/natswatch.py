"""Is a NATS connection really usable? A round trip with its own timeout, and a watch that moves a connection
that is not to another server (or reconnects it), within seconds.

The client's own signals are not enough across hosts:
- a cut link leaves the TCP connection open: nats-py reports itself connected, and notices only after
  `ping_interval` × `max_outstanding_pings` (30 s and more);
- nats-py 2.16's `flush(timeout=…)` cancels its PONG future on timeout, and when the link heals the late
  PONG is set on that cancelled future: the client's read loop dies of InvalidStateError while the client
  still says it is connected, and later flushes return at once (tests/test_nats_liveness.py reproduces it).
  jetpipe never calls `flush` with a timeout on a connection it keeps: it uses `round_trip` instead, whose
  late reply is dropped safely;
- a node cut off from the rest of its cluster keeps its clients, but answers their JetStream requests
  with "503 JetStream system temporarily unavailable" for as long as the partition lasts.

`round_trip` asks the server for the account's JetStream info (`$JS.API.INFO`, which every jetpipe user,
processing services included, may ask): an answer proves the connection, the server and its JetStream
work. `ConnectionWatch` does that every WATCH_S on a long-lived connection; after WATCH_STRIKES failures
in a row it forces a reconnect, which nats-py makes to the next server of the URL's list (a dead link) or
the same one once it answers again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import nats.errors
from nats.aio.client import Client

from pipeline.settings import redact

log = logging.getLogger(__name__)

#: Seconds between two checks of a watched connection.
WATCH_S = 2.0
#: Seconds one check waits for the server's answer.
ROUND_TRIP_TIMEOUT_S = 2.0
#: Failed checks in a row after which the connection is moved (about WATCH_S × strikes + the timeouts).
WATCH_STRIKES = 2
#: Subject of the round trip: JetStream's account info.
INFO_SUBJECT = "$JS.API.INFO"


async def round_trip(nc: Client, timeout_s: float = ROUND_TRIP_TIMEOUT_S) -> str | None:
    """None if the server answered a JetStream request within `timeout_s`; otherwise why it did not.

    Everything published on this connection before the call has reached the server when it returns None
    (a server handles one connection's messages in order), so it also confirms earlier publishes.
    """
    if nc.is_closed:
        return "connection closed"
    if not nc.is_connected:
        return "not connected (reconnecting)"
    try:
        answer = await nc.request(INFO_SUBJECT, b"", timeout=timeout_s)
    except nats.errors.NoRespondersError:
        return "JetStream does not answer on this server (no responders)"
    except (nats.errors.TimeoutError, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    except (nats.errors.Error, OSError) as exc:
        return str(exc) or type(exc).__name__
    try:
        error = json.loads(answer.data or b"{}").get("error")
    except ValueError:
        return "an unreadable answer to a JetStream request"
    if error:
        return f"JetStream: {error.get('description', 'error')} ({error.get('code', '?')})"
    return None


class ConnectionWatch:
    """Checks one connection every WATCH_S until stopped; forces a reconnect after WATCH_STRIKES failures."""

    def __init__(self, nc: Client, *, name: str, every_s: float = WATCH_S, timeout_s: float = ROUND_TRIP_TIMEOUT_S,
                 strikes: int = WATCH_STRIKES):
        self.nc = nc
        self.name = name
        self.every_s = every_s
        self.timeout_s = timeout_s
        self.strikes = strikes
        self.moved = 0  # reconnects this watch forced
        self._stopped = asyncio.Event()
        self._failing_since: float | None = None

    def stop(self) -> None:
        self._stopped.set()

    async def run(self) -> None:
        failed = 0
        while not self._stopped.is_set():
            try:
                await asyncio.wait_for(self._stopped.wait(), self.every_s)
                return
            except TimeoutError:
                pass
            if self.nc.is_closed:
                return
            if not self.nc.is_connected:  # the client is reconnecting by itself: let it
                failed = 0
                continue
            why = await round_trip(self.nc, self.timeout_s)
            if why is None:
                if self._failing_since is not None:
                    log.info("%s: NATS answers again after %.0f s", self.name, time.monotonic() - self._failing_since)
                    self._failing_since = None
                failed = 0
                continue
            failed += 1
            self._failing_since = self._failing_since or time.monotonic()
            if failed < self.strikes:
                continue
            failed = 0
            await self._move(why)

    async def _move(self, why: str) -> None:
        server = self.nc.connected_url
        where = redact(server.geturl()) if server else "its server"
        log.warning("%s: NATS at %s does not answer as it should (%s); reconnecting%s", self.name, where, why,
                    " to another server" if len(self.nc.servers) > 1 else "")
        self.moved += 1
        try:
            await self.nc.force_reconnect()
        except Exception as exc:  # noqa: BLE001 - the client's own reconnect goes on regardless
            log.debug("%s: force_reconnect: %s", self.name, exc)
