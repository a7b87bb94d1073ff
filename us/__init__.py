"""US (overseas) market: configuration and token manager."""

from kis_token_guard import check_common_is_ours

check_common_is_ours(__file__)
