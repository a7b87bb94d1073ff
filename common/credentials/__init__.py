"""What a credential is and how the broker hands one out: the app key's identity, the token and
approval key records, the two credential kinds and the HTTP client of the broker's endpoints."""
