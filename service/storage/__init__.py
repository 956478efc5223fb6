"""Storage backends behind service.core.ports.HandoffStore."""
