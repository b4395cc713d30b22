"""Event plane: KV events and load reports. NATS in production, memory in unit tests."""
