# SPDX-License-Identifier: MIT
"""A small agent platform on Celery with throttle, run by ``make demo`` (``examples/demo.py``):
a SIMULATED LLM provider, the app and its tasks, and a producer of agent work."""
