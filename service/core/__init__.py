"""The handoff rules, in plain typed Python: no grpc, no starlette, no httpx here.

Adapters (the gRPC servicer, the webhook gateway, the Brevo HTTP client, the storage
backends) live beside this package and talk to it through the Protocols in ``ports``.
"""
