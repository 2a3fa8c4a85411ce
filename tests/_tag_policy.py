"""A ``tiled serve config`` with users and tiled's tag-based access policy, for the tests.

Three users of a toy password provider: ``beamline`` writes the runs (the root's tag
``facility`` lets it) and owns the proposals' tags, ``alice`` may read what is tagged
``proposal_a``, ``bob`` what is tagged ``proposal_b``.
The tag definitions are compiled into the catalog's database before the server starts, as
tiled's ``AccessTagsCompiler`` does for a facility.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
from _faults import free_port, wait_until_serving

PASSWORDS = {"beamline": "beamline-secret", "alice": "alice-secret", "bob": "bob-secret"}
READ = ["read:metadata", "read:data"]
WRITE = [*READ, "write:metadata", "write:data", "create:node", "register", "create:apikeys"]
TAGS = {
    "roles": {"reader": {"scopes": READ}, "writer": {"scopes": WRITE}},
    "tags": {
        "proposal_a": {"users": [{"name": "alice", "role": "reader"},
                                 {"name": "beamline", "role": "writer"}]},
        "proposal_b": {"users": [{"name": "bob", "role": "reader"},
                                 {"name": "beamline", "role": "writer"}]},
        # The catalog's root: the beamline writes runs into it.
        "facility": {"users": [{"name": "beamline", "role": "writer"}]},
    },
    "tag_owners": {"proposal_a": {"users": [{"name": "beamline"}]},
                   "proposal_b": {"users": [{"name": "beamline"}]}},
}  # fmt: skip


def _config(folder: Path) -> dict:
    return {
        "authentication": {
            "providers": [
                {
                    "provider": "toy",
                    "authenticator": "tiled.authenticators:DictionaryAuthenticator",
                    "args": {"users_to_passwords": PASSWORDS},
                }
            ],
            "secret_keys": ["a-secret-of-the-tests-only-of-32-bytes-or-more"],
        },
        "database": {"uri": f"sqlite:///{folder / 'authn.db'}", "init_if_not_exists": True},
        "access_control": {
            "access_policy": "tiled.access_control.access_policies:TagBasedAccessPolicy",
            "args": {
                "provider": "toy",
                "access_tags_parser": "tiled.access_control.access_tags:AccessTagsParser",
            },
        },
        "catalog": {
            "uri": f"sqlite:///{folder / 'catalog.db'}",
            "writable_storage": [str(folder / "data"), f"sqlite:///{folder / 'tables.db'}"],
            "readable_storage": [str(folder / "assets")],
            # Everyone may list the root; each run is then shown to whom its tags allow.
            "top_level_access_tags": ["public", "facility"],
        },
    }


async def _compile_tags(catalog: Path) -> None:
    from tiled.access_control.access_tags import AccessTagsCompiler
    from tiled.access_control.scopes import ALL_SCOPES
    from tiled.server.settings import DatabaseSettings

    compiler = AccessTagsCompiler(
        ALL_SCOPES, TAGS, DatabaseSettings(uri=f"sqlite:///{catalog}"), lambda group: []
    )
    compiler.load_tag_config()
    await compiler.compile()


class TagPolicyServer:
    def __init__(self, folder: Path) -> None:
        from bluesky_analysis_store._catalog_template import copy_empty_catalog

        self.folder = folder
        self.assets = folder / "assets"
        for name in ("data", "assets"):
            (folder / name).mkdir(parents=True, exist_ok=True)
        if not copy_empty_catalog(folder / "catalog.db"):
            raise RuntimeError("no empty catalog to copy")
        asyncio.run(_compile_tags(folder / "catalog.db"))
        config = folder / "config.json"  # JSON is YAML too
        config.write_text(json.dumps(_config(folder)))
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        tiled = Path(sys.executable).with_name("tiled")
        log = open(folder / "server.log", "ab")  # noqa: SIM115 - the server's stdout
        self.process = subprocess.Popen(
            [str(tiled), "serve", "config", str(config), "--host", "127.0.0.1",
             "--port", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        wait_until_serving(self.process, self.uri, self.log)

    def api_key(self, user: str) -> str:
        """An API key of ``user``'s, made after logging in with the user's password."""
        tokens = httpx.post(
            f"{self.uri}/api/v1/auth/provider/toy/token",
            data={"grant_type": "password", "username": user, "password": PASSWORDS[user]},
        )
        tokens.raise_for_status()
        key = httpx.post(
            f"{self.uri}/api/v1/auth/apikey",
            json={"scopes": ["inherit"], "expires_in": None, "note": "tests"},
            headers={"Authorization": f"Bearer {tokens.json()['access_token']}"},
        )
        key.raise_for_status()
        return key.json()["secret"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        return (self.folder / "server.log").read_text(errors="replace")
