"""KR (domestic) market: configuration and token manager."""

from us import check_common_is_ours

check_common_is_ours()
