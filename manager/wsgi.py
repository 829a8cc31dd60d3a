"""Entry point for gunicorn: `gunicorn manager.wsgi:app` with BASTION_DATA_DIR set."""

from manager.app import create_app

app = create_app()
