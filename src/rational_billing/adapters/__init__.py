"""Adapters: implementations of the ports (storage, mail, the Stripe gateway)."""
