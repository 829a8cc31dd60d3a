"""Certificates: ACME through the certbot CLI (HTTP-01 webroot, Cloudflare DNS-01), uploads, status, renewal.

- `checks`: validation of domains, certificate names, the ACME URL and e-mail (nothing else reaches argv);
- `pem`: reading and checking certificates and keys (uploads, status);
- `certbot`: the certbot command lines and their runs (argv lists, never a shell);
- `state`: what certbot does not keep (source, last renewal attempt, last deploy), in a small JSON file;
- `manage`: the operations the API and the CLI call (obtain, renew, upload, remove, list, deployed).
"""
