"""Entry point for gunicorn: `gunicorn manager.wsgi:app` with BASTION_DATA_DIR set."""

from flask import has_request_context, request

from authsvc import logconfig
from manager.app import create_app

logconfig.configure(request_id=lambda: request.headers.get("X-Request-ID") if has_request_context() else None)
app = create_app()
