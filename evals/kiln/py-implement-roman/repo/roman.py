def to_roman(n):
    """1994 -> 'MCMXCIV'."""
    raise NotImplementedError
