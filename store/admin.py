"""`bitsearch-admin`: manage API keys (and the schema) on the configured database.

bitsearch-admin create-key OWNER        prints a new key once; only its hash is stored
bitsearch-admin list-keys
bitsearch-admin revoke-key ID
bitsearch-admin migrate
"""

from __future__ import annotations

import argparse
import sys

from sqlalchemy import select, update

from store.auth import create_key
from store.db import migrate, session_scope
from store.models import ApiKey
from store.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bitsearch-admin", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("create-key")
    p.add_argument("owner")
    sub.add_parser("list-keys")
    p = sub.add_parser("revoke-key")
    p.add_argument("id", type=int)
    sub.add_parser("migrate")
    args = parser.parse_args(argv)

    url = get_settings().resolved_database_url()
    migrate(url)
    try:
        with session_scope(url) as db:
            if args.command == "create-key":
                print(create_key(db, args.owner))
            elif args.command == "list-keys":
                for k in db.scalars(select(ApiKey).order_by(ApiKey.id)):
                    state = "revoked" if k.revoked else "active"
                    print(f"{k.id}\t{k.owner}\t{k.prefix}...\t{state}\t{k.created_at:%Y-%m-%d}")
            elif args.command == "revoke-key":
                if db.execute(update(ApiKey).where(ApiKey.id == args.id).values(revoked=True)).rowcount != 1:
                    raise ValueError(f"no key with id {args.id}")
    except ValueError as e:
        print(f"bitsearch-admin: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
