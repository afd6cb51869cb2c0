"""The domain: programme rules (pure decide/evolve), the application layer and the event store."""
