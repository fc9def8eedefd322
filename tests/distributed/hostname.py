"""``[core] hostname_callable`` of the distributed stack: each "host" is a process group on one machine.

On a real deployment every worker and triggerer runs on its own machine and Airflow records its fully
qualified domain name. Here the two Celery workers and the two triggerers share one machine, so each gets
a name of its own from ``IMAGEN_DIST_HOST`` (set in its environment by the stack): the task instance's
``hostname``, its history rows and the triggerer's job row then say which "host" ran what.
"""

from __future__ import annotations

import os
import socket


def hostname() -> str:
    return os.environ.get("IMAGEN_DIST_HOST") or socket.getfqdn()
