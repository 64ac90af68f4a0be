"""The environment that starts a whole test stack (``minard up``) on free ports."""

from __future__ import annotations

import os
from pathlib import Path

from minard import metrics
from minard.testing import free_port


def stack_env(directory: Path, **settings: object) -> dict[str, str]:
    """``minard up``'s environment: every port free, the stack in *directory*.

    The caller's ``MINARD_*`` variables are dropped so that nothing of the
    developer's shell leaks in; *settings* are configuration keys
    (``stack_sim_events=5000``) added as ``MINARD_*`` variables.
    """
    p = {k: free_port() for k in ("redis", "disp", "zd", "zc", "zb", "orca", "web", "log", "nginx", "tls")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINARD_")}
    env.update({
        "MINARD_REDIS_URL": f"redis://127.0.0.1:{p['redis']}/0",
        "MINARD_DISPATCHER_PORT": str(p["disp"]),
        "MINARD_ZMQ_DISPATCH": f"tcp://127.0.0.1:{p['zd']}",
        "MINARD_ZMQ_CMOS": f"tcp://127.0.0.1:{p['zc']}",
        "MINARD_ZMQ_BASE": f"tcp://127.0.0.1:{p['zb']}",
        "MINARD_ORCA_PORT": str(p["orca"]),
        "MINARD_WEB_PORT": str(p["web"]),
        "MINARD_LOG_PORT": str(p["log"]),
        "MINARD_NGINX_PORT": str(p["nginx"]),
        "MINARD_NGINX_TLS_PORT": str(p["tls"]),
        "MINARD_STACK_DIR": str(directory),
        # a free port for every program's /metrics (default: consecutive from 9100)
        **{f"MINARD_METRICS_PORT_{prog.upper()}": str(free_port()) for prog in metrics.PROGRAMS},
    })
    env.update({f"MINARD_{key.upper()}": str(value) for key, value in settings.items()})
    return env
