import re


def slugify(s):
    """'Hello, World!' -> 'hello-world'."""
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")
