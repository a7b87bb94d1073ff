"""The package's exceptions: one small tree, with a ``retryable`` flag on the base."""

from __future__ import annotations

#: ``msg_cd`` values of an ordinary API answer that mean "this token is not accepted": expired, and
#: invalid or revoked. The broker sends them with HTTP 500, sometimes 200.
REJECTED_TOKEN_CODES = frozenset({"EGW00123", "EGW00121"})
#: The broker's codes for an app key or secret it does not accept (another try will not help).
CREDENTIAL_CODES = frozenset({"EGW00102", "EGW00103", "EGW00104", "EGW00105", "EGW02004"})


class KISTokenError(Exception):
    """Base of every error this package raises on purpose.

    Attributes:
        retryable: True when the same request may succeed if sent again later (network faults,
            5xx, garbled answers); False for refusals that another try will not change.
    """

    retryable = False


class ConfigError(KISTokenError):
    """A configuration variable is missing or malformed; the message names it."""


class BrokerError(KISTokenError):
    """The broker refused a request and said why.

    Attributes:
        code: the broker's error code, e.g. ``EGW00133``.
        broker_message: the broker's own description.
        status: the HTTP status of the answer, when there was one.
    """

    def __init__(self, code: str, broker_message: str, status: int | None = None) -> None:
        self.code = code
        self.broker_message = broker_message
        self.status = status
        super().__init__(f"broker refused: {code} {broker_message}".rstrip())


class RateLimitedError(BrokerError):
    """A token was asked for too soon (``EGW00133``: one issuance a minute per app key).

    """


class RequestHeldBackError(RateLimitedError):
    """This host asked less than a minute ago, so the request was not sent at all."""

    CODE = "LOCAL"

    def __init__(self, message: str, retry_in: float = 0.0) -> None:
        super().__init__(self.CODE, message)
        self.args = (f"not asking the broker: {message}",)
        #: seconds until a request may be sent again
        self.retry_in = retry_in

    def __str__(self) -> str:
        return self.args[0]


class DailyLimitError(RequestHeldBackError):
    """The key's daily budget of issuances (``KIS_TOKEN_DAILY_LIMIT``) is spent: nothing was sent."""

    CODE = "DAILY_LIMIT"


class CredentialsError(BrokerError):
    """The broker rejected the app key or secret (``EGW00103``, ``EGW00105``, ...)."""


class TransientError(KISTokenError):
    """The broker could not be reached or gave an unusable answer (network, 5xx, HTML, truncated)."""

    retryable = True


class NotSentError(TransientError):
    """The request never reached the broker (connection refused, name lookup, TLS handshake or
    connect timeout): it spent none of the key's one-a-minute allowance."""

    reached_broker = False


class AnswerLostError(KISTokenError):
    """The broker accepted a request but its answer did not arrive in time. It may have issued a
    token (and texted the user), and it refuses a second request within the minute, so this is not
    retried at once; within 6 h of an issuance the next request gets the same token back.

    Attributes:
        succeeded: the answer's status line said success (a token was most likely issued); False
            when no status arrived at all (a broker that hangs issues nothing, most likely).
    """

    def __init__(self, message: str, succeeded: bool = False) -> None:
        super().__init__(message)
        self.succeeded = succeeded


class BadResponseError(KISTokenError):
    """The broker answered with something that is not a usable token (missing fields, wrong types,
    already expired)."""


class TokenUnavailableError(KISTokenError):
    """No valid token is held and none could be obtained now."""


class StoreError(KISTokenError):
    """The token directory or one of its files cannot be written."""


class StoreUnreachableError(StoreError):
    """The shared token store did not answer (or rests after a failure): the host uses its files."""


class CorruptRecordError(StoreError, ValueError):
    """A stored record (or renewal state) could not be used; the message says why, never quoting
    the token."""


class DirectoryError(ConfigError, StoreError):
    """The token directory cannot be used by this user (cannot be created, or belongs to another
    user): a configuration error (exit 3), named with ``KIS_TOKEN_DIR``."""


class LockTimeoutError(KISTokenError):
    """Another process held the renewal lock for longer than the bounded wait."""


class BudgetTimeoutError(KISTokenError):
    """The key's calls-a-second budget has no free slot within the caller's timeout: nothing was
    reserved and nothing sent (other processes or hosts of the key are spending it).

    Attributes:
        retry_in: seconds until the next free slot when it was looked at (None: not known, e.g. the
            budget's file stayed locked).
    """

    retryable = True

    def __init__(self, message: str, retry_in: float | None = None) -> None:
        super().__init__(message)
        self.retry_in = retry_in


class SessionHeldError(KISTokenError):
    """The app key's one WebSocket session is held by another process or host (the broker allows one
    a key and answers a second ``OPSP8996 ALREADY IN USE appkey``), and it was not freed within the
    caller's wait; or the broker said so itself (held elsewhere, outside this package).

    Attributes:
        holder: who holds it, when known (a ``common.session.Holder``: host, pid, market, since); None
            when the broker said ``OPSP8996`` or the holder has not written its record yet.
        elsewhere: True when the broker refused the session (``OPSP8996``): a program that does not
            use this package's lease holds it.
    """

    retryable = True

    def __init__(self, message: str, holder: object = None, elsewhere: bool = False) -> None:
        super().__init__(message)
        self.holder = holder
        self.elsewhere = elsewhere
