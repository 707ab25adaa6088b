def last_n(xs, n):
    """The last n elements of xs (all of them when n >= len(xs))."""
    if n <= 0:
        return []
    return xs[-n - 1:]
