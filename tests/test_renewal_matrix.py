"""The renewal matrix of issue 4: token age x broker behaviour -> expected outcome."""

from __future__ import annotations

import pytest
import requests
import responses

from common.credentials.records import TokenRecord
from common.errors import TokenUnavailableError
from common.renewal import policy
from tests.conftest import DAY, TOKEN_URL, fake_token, refusal, token_answer

AGES = {
    "fresh": policy.ADVISORY_WINDOW + 600,
    "early": policy.ADVISORY_WINDOW - 60,
    "late": policy.MANDATORY_WINDOW - 60,
    "expired": -60,
}
BROKERS = {
    "up": [{"json": "NEW"}],
    "refusing": [{"status": 403, "json": refusal("EGW00133")}],
    "failing": [{"status": 503, "body": "<html>unavailable</html>"}]
    + [{"body": requests.ConnectionError("refused")}] * 3,
    "garbage": [{"status": 200, "body": "<html>maintenance</html>"}] * 4,
}


@pytest.mark.parametrize("broker", BROKERS)
@pytest.mark.parametrize("age", AGES)
def test_renewal_matrix(us, clock, age, broker):
    seeded = TokenRecord(fake_token(1), "Bearer", clock() - DAY, clock() + AGES[age], "us", "real",
                         us.key_fingerprint())
    us.save_token(seeded)
    before = us.store.record.path.read_bytes()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        for answer in BROKERS[broker]:
            if answer.get("json") == "NEW":
                answer = {"json": token_answer(fake_token(2), clock() + DAY)}
            mock.post(TOKEN_URL, **answer)
        if age == "fresh":
            expected, requests_sent = fake_token(1), 0
        elif broker == "up":
            expected, requests_sent = fake_token(2), 1
        elif age == "expired":
            expected, requests_sent = TokenUnavailableError, len(BROKERS[broker])
        else:
            expected, requests_sent = fake_token(1), len(BROKERS[broker])

        if expected is TokenUnavailableError:
            with pytest.raises(TokenUnavailableError, match="no valid us token"):
                us.get_valid_token()
        else:
            for _ in range(3):  # and again: a failed renewal is not retried at once
                assert us.get_valid_token() == expected
        assert len(mock.calls) == requests_sent
    if expected != fake_token(2):
        assert us.store.record.path.read_bytes() == before  # the good token on disk is untouched
