"""Brevo Conversations adapters: the HTTP client and a local sandbox that imitates Brevo."""
