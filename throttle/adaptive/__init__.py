# SPDX-License-Identifier: MIT
"""Adaptive limits: what the upstream provider says about its own limits (:mod:`.upstream`)."""

from throttle.adaptive.upstream import Feedback, UpstreamThrottled, feedback_from, parse_headers

__all__ = ["Feedback", "UpstreamThrottled", "feedback_from", "parse_headers"]
