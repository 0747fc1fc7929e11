"""The fedstream coordinator daemon."""
