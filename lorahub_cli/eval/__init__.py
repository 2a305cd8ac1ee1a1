"""Evaluating compositions on task suites: BBH, the user's own tasks, the demo's held-out tasks."""
