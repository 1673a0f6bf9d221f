import sys

from silo.native import main

sys.exit(main(sys.argv[1:]))
