"""One blueprint per resource of the management API (see base.ApiBlueprint for how routes are declared)."""

from manager.api import (
    access,
    blocks,
    certificates,
    compat,
    keys,
    metrics,
    ollama_models,
    openapi,
    operations,
    pages,
    pools,
    session,
)

BLUEPRINTS = [
    session.bp,
    compat.bp,
    keys.bp,
    pools.bp,
    pools.routes_bp,
    ollama_models.bp,
    access.groups_bp,
    access.users_bp,
    access.settings_bp,
    operations.config_bp,
    operations.usage_bp,
    operations.audit_bp,
    operations.health_bp,
    blocks.bp,
    certificates.bp,
    metrics.bp,
    metrics.token_bp,
    openapi.bp,
    pages.bp,
]
