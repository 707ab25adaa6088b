def slugify(s):
    """'Hello, World!' -> 'hello-world'."""
    raise NotImplementedError
