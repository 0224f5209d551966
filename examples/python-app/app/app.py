"""The python-app example: greets with $APP_GREETING and says where it runs."""

import os
import platform
import sys

from greeting import greet


def main() -> int:
    print(greet(os.environ.get("APP_GREETING", "hello"), os.environ.get("USER", "sandbox")))
    print(f"python {platform.python_version()} in {os.getcwd()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
