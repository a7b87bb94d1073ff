"""The per-key WebSocket session lease (issue 19): the broker's one session per app key,
kept for every process of a key on a host (through the token directory) and every host (through
``KIS_TOKEN_STORE``).

The broker answers a second session of a key ``OPSP8996`` ``ALREADY IN USE appkey``, and connect/close
loops can get the key or the IP blocked for a while. A caller holds the key's lease for as long as it
keeps its socket (``manager.websocket_session()`` on the facade; :class:`SessionLease` here); a
second caller gets :class:`common.errors.SessionHeldError` naming the holder (host, pid, since) at
once, or waits up to a timeout it chose; two leases of a key start at least
:attr:`SessionTimes.pace` apart. Pieces: ``holder`` (who holds it, the times, the pacing rule; pure),
``file_lease`` (one host: ``flock`` held for the whole session), ``redis_lease`` (several hosts: a
lease with a time to live and a heartbeat), ``lease`` (the two together, sync and async),
``refusal`` (the broker's ``OPSP8996``). It imports nothing of the managers, the auth adapters or the CLI.
"""

from common.session.holder import DEFAULT_TIMES, Holder, SessionTimes, pace_delay
from common.session.lease import SessionLease, open_session
from common.session.refusal import IN_USE_CODE, raise_if_refused, session_refused

__all__ = ["DEFAULT_TIMES", "IN_USE_CODE", "Holder", "SessionLease", "SessionTimes", "open_session",
           "pace_delay", "raise_if_refused", "session_refused"]
