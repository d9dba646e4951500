"""Configuration, orchestration, cache registry and cost ledger."""
