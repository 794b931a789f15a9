import sys

from steptitan.cli import main

sys.exit(main())
