import sys

from pocketpacs.cli import main

sys.exit(main())
