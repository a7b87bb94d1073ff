"""US (overseas) market configuration: file prefix and the names of this market's variables."""

TOKEN_FILE_PREFIX = "us_"
MOJITO_TOKEN_FILE = f"{TOKEN_FILE_PREFIX}krs_token.dat"

APP_KEY_VAR = "KIS_US_APP_KEY"
APP_SECRET_VAR = "KIS_US_APP_SECRET"
ACCOUNT_VAR = "KIS_US_ACCOUNT"
BASE_URL_VAR = "KIS_US_BASE_URL"

#: Default exchange of mojito2 broker objects for this market.
BROKER_EXCHANGE = "나스닥"
#: Default `warmup --valid-for` horizon in seconds. It covers the regular US session
#: (23:30-06:00 KST, 22:30-05:00 in US daylight saving time) from a warm-up run at 22:00 KST.
WARMUP_VALID_FOR = 9 * 3600
