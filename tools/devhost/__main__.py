import sys

from tools.devhost.cli import main

sys.exit(main())
