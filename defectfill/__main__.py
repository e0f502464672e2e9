import sys

from defectfill.cli import main

sys.exit(main())
