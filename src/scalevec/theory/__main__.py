import sys

from scalevec.theory import main

sys.exit(main())
