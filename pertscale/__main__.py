import sys

from pertscale.cli import main

sys.exit(main())
