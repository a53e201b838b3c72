"""``python -m ditcache``: the ``ditcache`` command (see ``ditcache.cli``)."""

from ditcache.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
