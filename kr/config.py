"""KR (domestic) market configuration: file prefix and the names of this market's variables."""

TOKEN_FILE_PREFIX = "kr_"
MOJITO_TOKEN_FILE = f"{TOKEN_FILE_PREFIX}krs_token.dat"

APP_KEY_VAR = "KIS_KR_APP_KEY"
APP_SECRET_VAR = "KIS_KR_APP_SECRET"
ACCOUNT_VAR = "KIS_KR_ACCOUNT"
BASE_URL_VAR = "KIS_KR_BASE_URL"

#: Default exchange of mojito2 broker objects for this market.
BROKER_EXCHANGE = "서울"
#: Default `warmup --valid-for` horizon in seconds. It covers the regular KR session
#: (09:00-15:30 KST) from a warm-up run at 08:00 KST.
WARMUP_VALID_FOR = 8 * 3600
