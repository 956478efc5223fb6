"""The HTTP gateway: Brevo's webhooks in, handed to the core."""
