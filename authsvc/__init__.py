"""The request gate nginx consults for every API request (plain WSGI, no Flask on the hot path)."""
