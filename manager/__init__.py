"""Bastion's management side: store, nginx rendering and applying, CLI, supervisor and the Flask app."""
