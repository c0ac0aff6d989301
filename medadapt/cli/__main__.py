import sys

from medadapt.cli import main

sys.exit(main())
