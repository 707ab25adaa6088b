def word_counts(text):
    """'The cat, the hat.' -> {'the': 2, 'cat': 1, 'hat': 1}"""
    raise NotImplementedError
