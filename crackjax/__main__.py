import sys

from crackjax.cli import main

sys.exit(main())
