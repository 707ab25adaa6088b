import re
from collections import Counter


def word_counts(text):
    """'The cat, the hat.' -> {'the': 2, 'cat': 1, 'hat': 1}"""
    return dict(Counter(re.findall(r"[a-z0-9]+", text.lower())))
