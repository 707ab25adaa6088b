import unittest
from words import word_counts


class Words(unittest.TestCase):
    def test_counts(self):
        self.assertEqual(word_counts("The cat, the hat."), {"the": 2, "cat": 1, "hat": 1})

    def test_empty(self):
        self.assertEqual(word_counts("  ...  "), {})

    def test_apostrophes_split(self):
        self.assertEqual(word_counts("it's"), {"it": 1, "s": 1})
