"""One blueprint per resource of the management API."""
