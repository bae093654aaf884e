import sys

from crossrank.reproduce.cli import main

sys.exit(main())
