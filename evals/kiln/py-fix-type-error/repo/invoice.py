def format_total(prices):
    """Sum of prices with two decimals and the currency: [10, 2.5] -> '12.50 EUR'."""
    total = sum(prices)
    return total + " EUR"
