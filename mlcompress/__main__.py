import sys

from mlcompress.cli import main

sys.exit(main())
