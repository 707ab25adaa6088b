import unittest
from search import find


class Search(unittest.TestCase):
    def test_every_element(self):
        xs = [1, 3, 5, 7, 9, 11]
        for i, x in enumerate(xs):
            self.assertEqual(find(xs, x), i)

    def test_missing(self):
        self.assertEqual(find([1, 3, 5], 4), -1)
        self.assertEqual(find([], 4), -1)
        self.assertEqual(find([1, 3, 5], 6), -1)
