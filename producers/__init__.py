"""What enqueues jobs. Never imports `workers`."""

from producers.client import Client, WaitTimeout

__all__ = ["Client", "WaitTimeout"]
