import unittest
from invoice import format_total


class Invoice(unittest.TestCase):
    def test_total(self):
        self.assertEqual(format_total([10, 2.5]), "12.50 EUR")

    def test_empty(self):
        self.assertEqual(format_total([]), "0.00 EUR")
