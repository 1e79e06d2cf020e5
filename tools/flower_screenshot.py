# SPDX-License-Identifier: MIT
"""Take ``docs/flower.png``: Flower's page of a task that throttle deferred.

Starts a private redis-server, one ``celery worker`` of the suite's app (``tests.workerapp``)
with a limit of 2 per minute, and Flower with throttle's ``--conf``; sends three tasks under one
API key so the third waits for its slot, and photographs its page with headless Chromium
(``apt-get install chromium``). Everything it started is stopped on the way out.

    .venv/bin/python tools/flower_screenshot.py [--out docs/flower.png] [--chromium chromium]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.redis_servers import RedisServer  # noqa: E402
from tests.test_flower import flower_process, poll, wait_for_events  # noqa: E402
from tests.workers import Workers  # noqa: E402

# A slot every 30 s with a burst of 2: the third task waits about 30 s, long enough to photograph.
CONF = {
    "throttle_limits": {"per-key": {"rate": "2/m", "burst": 2}},
    "throttle_adaptive": {"enabled": False},
}
# Stands for a customer's key; the page must show only its fingerprint.
API_KEY = "sk-demo-0123456789abcdef"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "flower.png")
    parser.add_argument("--chromium", default="chromium")
    args = parser.parse_args()
    browser = shutil.which(args.chromium)
    if browser is None:
        sys.exit(f"{args.chromium} not found (Debian: apt-get install chromium)")

    with (
        tempfile.TemporaryDirectory(prefix="flower-shot-") as tmp,
        RedisServer() as server,
    ):
        base = server.url.rsplit("/", 1)[0]
        urls = {"store": f"{base}/0", "broker": f"{base}/1", "backend": f"{base}/2"}
        with Workers(**urls, conf=CONF, logdir=Path(tmp)) as workers:
            node = workers.start("gpu-worker-1")
            with flower_process(workers.env, Path(tmp) / "flower.log") as url:
                wait_for_events(url, node)
                # Publish as an application does: through an app with throttle installed,
                # which shows the API key and agent id as fingerprints in the argument reprs.
                os.environ.update(
                    {k: v for k, v in workers.env.items() if k.startswith("THROTTLE_")}
                )
                from tests import workerapp

                # Keep only the ids: a result object left to the interpreter's exit would
                # unsubscribe from a Redis that is gone by then.
                ids = [
                    workerapp.record.apply_async(
                        (i,), {"api_key": API_KEY, "agent_id": "researcher"}
                    ).id
                    for i in range(3)
                ]
                workerapp.app.close()
                deferred = ids[-1]
                poll(
                    lambda: (
                        deferred
                        in httpx.get(f"{url}/api/tasks", params={"state": "THROTTLED"}).json()
                    ),
                    30,
                    lambda: f"the third task was not deferred: {workers.log(node)}",
                )
                args.out.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run(
                    [
                        browser,
                        "--headless",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--hide-scrollbars",
                        f"--user-data-dir={tmp}/chromium",
                        f"--screenshot={args.out.resolve()}",
                        "--window-size=1280,900",
                        f"{url}/task/{deferred}",
                    ],
                    check=True,
                    capture_output=True,
                    timeout=60,
                )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
