import unittest
from text import slugify


class Slugify(unittest.TestCase):
    def test_basic(self):
        self.assertEqual(slugify("Hello, World!"), "hello-world")

    def test_runs(self):
        self.assertEqual(slugify("  a -- b__c  "), "a-b-c")

    def test_digits(self):
        self.assertEqual(slugify("Kiln 2.0 release"), "kiln-2-0-release")

    def test_empty(self):
        self.assertEqual(slugify("!!!"), "")
