import unittest
import users


class Users(unittest.TestCase):
    def test_roundtrip(self):
        users.register("  Ann@Example.COM ", "Ann")
        self.assertEqual(users.find("ann@example.com"), "Ann")
        self.assertIsNone(users.find("bob@example.com"))
