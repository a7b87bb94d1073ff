"""Shared token logic for the KIS Open API: policy, file store, broker HTTP client and CLI."""
