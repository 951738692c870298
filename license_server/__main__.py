import sys

from license_server.cli import main

sys.exit(main())
