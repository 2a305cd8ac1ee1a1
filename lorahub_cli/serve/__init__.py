"""Serving mixed-task traffic: routing requests to compositions, batching them, HTTP."""
