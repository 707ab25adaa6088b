def add_item(item, items=None):
    """Returns a list with item appended (a new list when none is given)."""
    if items is None:
        items = []
    items.append(item)
    return items
