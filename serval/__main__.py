import sys

from serval.cli import main

sys.exit(main())
