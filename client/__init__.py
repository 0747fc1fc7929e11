"""The fedstream client process and the Task interface."""
