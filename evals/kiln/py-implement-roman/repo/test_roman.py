import unittest
from roman import to_roman


class Roman(unittest.TestCase):
    def test_values(self):
        cases = {1: "I", 4: "IV", 9: "IX", 14: "XIV", 40: "XL", 90: "XC",
                 400: "CD", 1994: "MCMXCIV", 2024: "MMXXIV", 3999: "MMMCMXCIX"}
        for n, want in cases.items():
            self.assertEqual(to_roman(n), want, n)
