"""The log server's WSGI entry point: ``gunicorn -b 127.0.0.1:8081 -k gevent snoplus_log:app``.

The name is the original site's.  The app reads its configuration from
``conf/minard.conf`` and ``MINARD_*`` variables (``minard.config.load``) and
connects to nothing until the first request.
"""

from minard.ops.logserver import create_app

app = create_app()
