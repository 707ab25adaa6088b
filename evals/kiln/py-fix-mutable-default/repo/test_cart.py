import unittest
from cart import add_item


class Cart(unittest.TestCase):
    def test_fresh_lists(self):
        self.assertEqual(add_item("a"), ["a"])
        self.assertEqual(add_item("b"), ["b"])

    def test_given_list(self):
        xs = ["x"]
        self.assertEqual(add_item("y", xs), ["x", "y"])
        self.assertEqual(xs, ["x", "y"])
