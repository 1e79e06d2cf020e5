# SPDX-License-Identifier: MIT
"""The SIMULATED LLM provider the suite and the benchmarks call: the demo's own, in
``examples/agents/provider.py`` (one implementation)."""

from examples.agents.provider import Provider

__all__ = ["Provider"]
