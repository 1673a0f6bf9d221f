"""silo's CLI with ``--isolation LEVEL`` put into every ``silo run`` (the ``silo_cli`` of
test_vm_suite.py and test_gvisor_suite.py).

    python level_cli.py LEVEL CLI... -- ARGS...

runs ``CLI... ARGS...``, with ``--isolation LEVEL`` after ARGS' leading ``run``.
"""

import os
import sys

level = sys.argv[1]
split = sys.argv.index("--")
cli, args = sys.argv[2:split], sys.argv[split + 1:]
if args[:1] == ["run"]:
    args = ["run", "--isolation", level, *args[1:]]
os.execv(cli[0], [*cli, *args])
