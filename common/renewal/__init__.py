"""The renewal: when to renew (the policy), the locked transaction (the engine), its outcomes, alerts
and the asyncio entry points."""
