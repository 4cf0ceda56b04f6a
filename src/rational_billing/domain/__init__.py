"""Pure domain: models, access rules and normalisation of Stripe payloads. No I/O."""
