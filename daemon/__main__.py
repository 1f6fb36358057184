import sys

from overlapd.daemon.cli import main

sys.exit(main())
