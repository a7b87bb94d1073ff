"""The operator's commands: ``python -m us.token_manager|kr.token_manager`` (market), the status
report and the Prometheus metrics."""
