# SPDX-License-Identifier: MIT
"""The Celery side of ``throttle``: settings, the task option, the gate, deferral.

Named ``celeryext`` so it is never mistaken for ``celery`` itself. Import what you need from
the top-level ``throttle`` package.
"""

from throttle.celeryext.app import Throttle
from throttle.celeryext.gate import ThrottleExhausted
from throttle.celeryext.spec import limit
from throttle.celeryext.usage import report_upstream, report_usage

__all__ = ["Throttle", "ThrottleExhausted", "limit", "report_upstream", "report_usage"]
