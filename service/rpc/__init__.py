"""The gRPC adapter: HandoffService over service.core, and the server factory."""
