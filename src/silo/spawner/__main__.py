"""``python -m silo.spawner FD``: serve the SDK process that started us on socket FD."""

import sys

from silo.spawner.core import serve_socketpair

serve_socketpair(int(sys.argv[1]))
