"""silo's CLI with ``--isolation vm`` put into every ``silo run`` (test_vm_suite.py's ``silo_cli``).

    python vm_cli.py CLI... -- ARGS...

runs ``CLI... ARGS...``, with ``--isolation vm`` after ARGS' leading ``run``.
"""

import os
import sys

split = sys.argv.index("--")
cli, args = sys.argv[1:split], sys.argv[split + 1:]
if args[:1] == ["run"]:
    args = ["run", "--isolation", "vm", *args[1:]]
os.execv(cli[0], [*cli, *args])
