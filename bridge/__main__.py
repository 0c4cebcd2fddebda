import sys

from odmr_bridge.cli import main

sys.exit(main())
