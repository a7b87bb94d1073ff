"""KR (domestic) market: configuration and token manager."""
