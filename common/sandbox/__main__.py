"""``python -m common.sandbox``: serve the stand-in broker on 127.0.0.1."""

from common.sandbox.server import main

raise SystemExit(main())
