"""The application layer above both markets: the ``kis-token`` console and the end-to-end demo."""
