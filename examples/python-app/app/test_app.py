"""Runs on the host (`python3 -m unittest` in app/); .dockerignore keeps it out of the image."""

import unittest

from greeting import greet


class GreetTest(unittest.TestCase):
    def test_greet(self) -> None:
        self.assertEqual(greet("hi", "you"), "hi, you!")


if __name__ == "__main__":
    unittest.main()
