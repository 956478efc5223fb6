"""Bot-to-human handoff service: gRPC API, Brevo relay, webhook-fed reply streams."""
