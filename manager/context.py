"""`Bastion`: one data dir's store, settings, nginx and the two ways changes reach the data plane."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any

from manager import admin_guard, generations
from manager import apply as applier
from manager import settings as settings_mod
from manager.audit import Audit
from manager.datadir import DataDir
from manager.keystore import KeyStore, migrate_from
from manager.logins import LoginState, drop_legacy_tables
from manager.nginx import Nginx
from manager.snapshot import publish
from manager.store import Store, StoreCorrupt, StoreNewer
from manager.usage import Usage

# store.json's layout: 1 keys moved to keys.sqlite3, 2 sign-in state moved to auth.sqlite3
STORE_VERSION = 2


class Bastion:
    def __init__(self, dirs: DataDir, nginx_binary: str | None = None):
        self.dirs = dirs
        dirs.ensure()
        self.store = Store(dirs.store)
        self.nginx = Nginx(dirs, nginx_binary)
        try:
            self._upgrade_store()
        except StoreNewer:
            raise
        except StoreCorrupt:  # an unreadable store is reported by whoever needs it; upgrades wait
            pass

    def _upgrade_store(self) -> None:
        """Bring store.json to STORE_VERSION, one step at a time; each step is idempotent (a crash before the
        version is written runs it again). A store written by a newer Bastion is refused, never rewritten."""
        version = self.store.version()
        if version > STORE_VERSION:
            raise StoreNewer(f"{self.store.path} was written by a newer Bastion (store version {version}, this "
                             f"one knows {STORE_VERSION}); upgrade Bastion or restore a backup")
        for step in range(version + 1, STORE_VERSION + 1):
            if step == 1:  # keys move to their SQLite store (manager/keystore.py)
                migrate_from(self.store, self.keystore)
            elif step == 2:  # sign-in state moves to auth.sqlite3 (manager/logins.py); what was kept is dropped
                drop_legacy_tables(self.store)
            self.store.set_version(step)

    @cached_property
    def keystore(self) -> KeyStore:
        return KeyStore(self.dirs.keys_db)

    @cached_property
    def pepper(self) -> bytes:
        return self.dirs.read_pepper()

    @cached_property
    def audit(self) -> Audit:
        return Audit(self.dirs.root / "audit.sqlite3")

    @cached_property
    def usage(self) -> Usage:
        return Usage(self.dirs.usage_db, self.dirs.access_log)

    @cached_property
    def logins(self) -> LoginState:
        """Sign-in failures and logged-out tokens, apart from the configuration (manager/logins.py)."""
        return LoginState(self.dirs.root / "auth.sqlite3")

    def settings(self) -> dict[str, Any]:
        return settings_mod.effective(self.store.settings())

    def publish_snapshot(self, only_pools: set[str] | None = None) -> None:
        """Hand pools, routes and CIDR groups to the gate (takes effect within a second, no restart); keys reach
        it from the key store."""
        publish(self, only_pools)

    def apply(self, author: str = "cli", *, force_reload: bool = False,
              extra_parallel: int | None = None) -> applier.ApplyResult:
        """Apply nginx config, then publish the snapshot that names the new pools (`extra_parallel`: a key's
        max_parallel value about to be stored, which needs its limit_conn zone first)."""
        result = applier.apply(self, author, force_reload=force_reload, extra_parallel=extra_parallel)
        self.publish_snapshot()
        return result

    @contextmanager
    def change(self, author: str, action: str, *, nginx: bool = False) -> Iterator[Store]:
        """One change to the configuration, all or nothing, recorded in the audit log.

        Runs under the store lock; afterwards publishes the snapshot, or applies the nginx config first when
        `nginx` is set. If anything fails (validation, `nginx -t`, reload) the store is put back as it was.
        An nginx change that would lock the requesting admin out of the admin listener is refused first.
        """
        with self.store.transaction():
            before = self.store.dump()
            guard = admin_guard.LockoutGuard(self) if nginx else None
            try:
                yield self.store
                if guard:
                    guard.check(self)
                    # first stop the gate from choosing pools that are about to leave nginx's config
                    self.publish_snapshot(only_pools=generations.live_pools(self.dirs))
                    self.apply(author)
                else:
                    self.publish_snapshot()
            except BaseException:
                self.store.restore(before)
                if nginx:
                    self.publish_snapshot()
                raise
            # the live generation records the configuration as it is now, so a rollback to it is a no-op
            generations.save_state(self.dirs, generations.live(self.dirs), generations.config_state(self.store))
        self.audit.record(author, action)
