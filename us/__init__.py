"""US (overseas) market: configuration and token manager."""
